"""Built-in tasks and the task registry (no Ray: tasks are plain torch)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from ray_metaopt.moe import ROUTING_METRIC_KEYS
from ray_metaopt.training.tasks import (
    _REGISTRY,
    DigitsTask,
    MoETask,
    SequenceTask,
    Task,
    TaskStep,
    TeacherStudentTask,
    available_tasks,
    make_task,
    register_task,
    resolve_device,
    task_factory,
)

BUILTINS = ["charlm", "digits", "digits_cnn", "mnist1d", "moe", "sequence", "teacher_student"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: several intra-op threads only contend with the other test processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(task: Task, steps: int, lr: float = 3e-3, batch_size: int = 64) -> torch.nn.Module:
    model = task.build_model()
    opt = torch.optim.AdamW(task.param_groups(model, lr=lr, weight_decay=0.0))
    for _ in range(steps):
        loss = task.training_step(model, batch_size).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_builtins_are_registered():
    assert set(BUILTINS) <= set(available_tasks())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_task_contract(name):
    _, task = make_task(name, seed=3, device="cpu")
    assert task.device == torch.device("cpu")
    model = task.build_model()
    assert all(p.device.type == "cpu" for p in model.parameters())
    step = task.training_step(model, 16)
    assert isinstance(step, TaskStep) and step.loss.ndim == 0 and step.loss.requires_grad
    step.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    evaluation = task.evaluate(model)
    assert math.isfinite(evaluation["val_loss"]) and evaluation["val_loss"] > 0
    assert all(isinstance(v, float) for v in evaluation.values())
    assert all(isinstance(v, float) for v in task.info().values())
    groups = task.param_groups(model, lr=1e-3, weight_decay=0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(model.parameters())) == len({id(p) for p in params})
    assert all(g["name"] and g["lr"] == 1e-3 for g in groups)


@pytest.mark.parametrize("name", BUILTINS)
def test_same_seed_same_model_and_batches_other_seed_same_problem(name):
    _, a = make_task(name, seed=1, device="cpu")
    _, b = make_task(name, seed=1, device="cpu")
    _, c = make_task(name, seed=2, device="cpu")
    ma, mb, mc = a.build_model(), b.build_model(), c.build_model()
    for pa, pb, pc in zip(ma.parameters(), mb.parameters(), mc.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(ma.parameters(), mc.parameters()))
    assert a.training_step(ma, 8).loss.item() == b.training_step(mb, 8).loss.item()
    # The validation set depends on data_seed only: the same model scores the same on both.
    assert a.evaluate(ma)["val_loss"] == c.evaluate(ma)["val_loss"]


@pytest.mark.parametrize("name", BUILTINS)
def test_state_dict_resumes_the_batch_stream(name):
    _, task = make_task(name, seed=0, device="cpu")
    model = task.build_model()
    task.training_step(model, 8)
    state = task.state_dict()
    expected = [task.training_step(model, 8).loss.item() for _ in range(3)]
    _, fresh = make_task(name, seed=0, device="cpu")
    fresh.load_state_dict(state)
    assert [fresh.training_step(model, 8).loss.item() for _ in range(3)] == expected


def test_state_dict_rejects_another_task():
    ts = TeacherStudentTask(device="cpu")
    with pytest.raises(ValueError, match="TeacherStudentTask"):
        SequenceTask(device="cpu").load_state_dict(ts.state_dict())


def test_teacher_student_noise_floor_is_what_the_teacher_scores():
    task = TeacherStudentTask(noise_std=0.2, device="cpu")
    info = task.info()
    assert info["noise_floor"] == pytest.approx(0.04)
    # The teacher itself is the Bayes-optimal predictor: its val loss is exactly the val floor.
    assert task.evaluate(task.teacher)["val_loss"] == pytest.approx(info["val_noise_floor"], rel=1e-5)
    assert info["val_noise_floor"] == pytest.approx(0.04, rel=0.15)  # 1024 samples of noise


def test_teacher_student_training_approaches_the_floor():
    task = TeacherStudentTask(seed=0, device="cpu")
    before = task.evaluate(task.build_model())["excess_loss"]
    after = task.evaluate(_train(task, 300))["excess_loss"]
    assert after < 0.2 * before and after > 0


def test_moe_task_groups_metrics_and_routing():
    task = MoETask(seed=0, device="cpu", gate_lr_scale=0.5)
    model = task.build_model()
    groups = task.param_groups(model, lr=2e-3, weight_decay=0.1)
    roles = {g["name"]: g["role"] for g in groups}
    assert roles["gate"] == "gate" and roles["expert"] == "expert"
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["gate"] == pytest.approx(1e-3) and lrs["expert"] == 2e-3
    assert {g["name"]: g["weight_decay"] for g in groups}["expert_no_decay"] == 0.0
    step = task.training_step(model, 64)
    assert sorted(step.metrics) == sorted(ROUTING_METRIC_KEYS)
    assert all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in step.metrics.values())
    assert 0.0 <= float(step.metrics["routing_entropy"]) <= 1.0
    evaluation = task.evaluate(model)
    assert set(ROUTING_METRIC_KEYS) <= set(evaluation)


def test_moe_task_targets_differ_by_cluster_and_floor():
    task = MoETask(noise_std=0.0, device="cpu", num_clusters=3)
    x, y, c, noise = task._sample(300, torch.Generator().manual_seed(0))
    assert torch.equal(noise, torch.zeros_like(noise))
    for k in range(3):
        expected = x[c == k] @ task.maps[k].T + task.offsets[k]
        assert torch.allclose(y[c == k], expected, atol=1e-5)
    assert not torch.allclose(task.maps[0], task.maps[1])


def test_moe_router_z_loss_adds_the_mean_squared_logsumexp_of_the_router_logits():
    plain = MoETask(seed=0, device="cpu", balance_weight=0.0)
    with_z = MoETask(seed=0, device="cpu", balance_weight=0.0, z_loss_weight=0.5)
    model = plain.build_model()
    added = (with_z.training_step(model, 32).loss - plain.training_step(model, 32).loss).item()
    x, _, _, _ = MoETask(seed=0, device="cpu")._sample(
        32, torch.Generator().manual_seed(0)
    )  # that same batch
    with torch.no_grad():
        _, logits = model(x)
    assert added == pytest.approx(0.5 * float(torch.logsumexp(logits, dim=-1).pow(2).mean()), rel=1e-5)
    assert added > 0


def test_moe_weight_decay_none_leaves_optimizer_default():
    task = MoETask(device="cpu")
    groups = task.param_groups(task.build_model(), lr=1e-3, weight_decay=None)
    assert all("weight_decay" not in g for g in groups)


def test_digits_split_and_learning():
    task = DigitsTask(seed=0, device="cpu", val_fraction=0.25)
    assert len(task.y_train) + len(task.y_val) == 1797
    assert len(task.y_val) == 449
    assert task.x_train.shape[1] == 64 and float(task.x_train.max()) <= 1.0
    assert task.evaluate(_train(task, 150))["val_accuracy"] > 0.85


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"ray_metaopt\[tasks\]"):
        DigitsTask(device="cpu")


@pytest.mark.parametrize(
    "tokens, delay, vocab, expected",
    [
        ([1, 2, 3, 4], 1, 8, [3, 5, 7]),
        ([7, 7, 1, 0, 5], 2, 8, [0, 7, 6]),
        ([2, 3, 4, 1], 3, 5, [3]),
    ],
)
def test_sequence_targets(tokens, delay, vocab, expected):
    task = SequenceTask(vocab=vocab, delay=delay, seq_len=len(tokens), val_size=1, device="cpu")
    x = torch.tensor([tokens])
    y = (x[:, delay:] + x[:, :-delay]) % vocab
    assert y.tolist() == [expected]
    # And the sampler produces exactly this relation.
    xs, ys = task._sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(ys, (xs[:, delay:] + xs[:, :-delay]) % vocab)


def test_sequence_task_learns_the_memory():
    task = SequenceTask(seed=0, device="cpu")
    assert task.info()["chance_loss"] == pytest.approx(math.log(8))
    assert task.evaluate(_train(task, 200, lr=1e-2))["val_accuracy"] > 0.8


def test_scale_knob_widens_models():
    small = sum(p.numel() for p in TeacherStudentTask(device="cpu").build_model().parameters())
    big = sum(p.numel() for p in TeacherStudentTask(device="cpu", scale=4).build_model().parameters())
    assert big > 8 * small


@pytest.mark.parametrize(
    "name, config, error, match",
    [
        (
            "teacher_student",
            {"hiden": 3},
            ValueError,
            r"keys \['hiden'\] that task .* does not accept; accepted keys are \[.*'hidden'",
        ),
        ("teacher_student", {"seed": 3}, ValueError, "must not set 'seed'"),
        ("teacher_student", {"noise_std": -1.0}, ValueError, "noise_std must be in"),
        ("moe", {"top_k": 9}, ValueError, "top_k must be <= num_experts=4"),
        ("moe", {"z_loss_weight": -1e-3}, ValueError, r"z_loss_weight must be in \[0, inf\]"),
        ("sequence", {"seq_len": 2, "delay": 2}, ValueError, "seq_len must be >= 3"),
        ("digits", {"val_fraction": 1.0}, ValueError, "val_fraction must be in"),
        ("nope", {}, ValueError, r"task must be one of \['charlm', 'digits', 'digits_cnn', 'mnist1d', 'moe', 'sequence', 'teacher_student'"),
    ],
)
def test_bad_task_configs(name, config, error, match):
    with pytest.raises(error, match=match):
        make_task(name, config, device="cpu")


class _Line(Task):
    """y = 2x: the example task of the Task docstring."""

    def __init__(self, *, slope: float = 2.0, seed: int = 0, device="auto"):
        super().__init__(seed=seed, device=device)
        self.slope = slope

    def build_model(self):
        with self.seeded():
            return torch.nn.Linear(1, 1).to(self.device)

    def training_step(self, model, batch_size):
        x = torch.randn(batch_size, 1, generator=self.generator).to(self.device)
        return TaskStep(loss=(model(x) - self.slope * x).pow(2).mean())

    def evaluate(self, model):
        x = torch.linspace(-1, 1, 16, device=self.device)[:, None]
        return {"val_loss": float((model(x) - self.slope * x).pow(2).mean())}


def test_register_a_user_task(monkeypatch):
    monkeypatch.setattr("ray_metaopt.training.tasks._REGISTRY", dict(_REGISTRY))
    register_task("line", _Line)
    assert "line" in available_tasks()
    name, task = make_task("line", {"slope": 3.0}, device="cpu")
    assert name == "line" and task.slope == 3.0
    with pytest.raises(ValueError, match="already registered"):
        register_task("line", _Line)
    register_task("line", _Line, overwrite=True)
    with pytest.raises(ValueError, match="without '/'"):
        register_task("a/b", _Line)
    with pytest.raises(TypeError, match="factory must be"):
        register_task("x", 42)


def test_task_given_as_class_or_import_path():
    assert task_factory(_Line) == ("_Line", _Line)
    name, factory = task_factory("ray_metaopt.training.tasks.sequence:SequenceTask")
    assert factory is SequenceTask and name == "SequenceTask"
    with pytest.raises(ValueError, match="could not be imported"):
        task_factory("ray_metaopt.training.tasks:Missing")


def test_factory_must_return_a_task():
    with pytest.raises(TypeError, match="not a Task"):
        make_task(lambda seed, device: object(), device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device; use device='auto'"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_tasks_on_cuda(name):
    _, task = make_task(name, seed=0, device="cuda")
    model = task.build_model()
    assert all(p.is_cuda for p in model.parameters())
    step = task.training_step(model, 16)
    assert step.loss.is_cuda and all(
        not isinstance(v, torch.Tensor) or v.is_cuda for v in step.metrics.values()
    )
    step.loss.backward()
    assert math.isfinite(task.evaluate(model)["val_loss"])
