#!/usr/bin/env bash
# The GPU checks of ray_metaopt, in one short run (< 6 minutes on 1 x H100 with 16 CPUs).
#
# For a GPU machine that has torch and numpy but no Ray and no network: first, here, from the
# repository root, put Ray's wheels in .whl/ (../shared/tools/README.md):
#     bash ../shared/tools/gpu-wheels.sh
# then, on the GPU machine, from the repository root (with .whl/ carried along):
#     bash scripts/gpu_check.sh
# It installs Ray from .whl/ into /tmp/site when `import ray` fails, and writes everything it
# prints to $OUT/gpu_check.log ($OUT defaults to /tmp/gpu_check_out). Exit status: 0 when every
# step passed (or was skipped for lack of CUDA), 1 otherwise.
#
# Steps (each with its own time limit):
#   1. environment: GPU, driver, Python, torch, Ray versions
#   2. multi-GPU placement on the real GPU(s): ray.init(num_gpus=<real count>), whole-GPU and
#      0.5-GPU trials of the provided training loop, model on the trial's GPU, policy actor on CPU
#      (tests/tune/test_gpu_placement.py run as a script; without CUDA: 2 simulated GPUs)
#   3. a short real CUDA Tune run of the provided trainable (metaopt_trainable: OptimizerWrapper +
#      plateau / RL meta-optimizers, teacher_student and moe tasks), two trials per GPU
#   4. no host sync on non-decision steps, under torch.cuda.set_sync_debug_mode("error")
#      (benchmarks/overhead.py --device cuda, which also times the wrapper's overhead)
#   5. the DDP tests (DistributedOptimizerWrapper: gloo processes and Ray Train's TorchTrainer)
# Without CUDA (e.g. on a CI machine) steps 2-4 print SKIP for their CUDA parts and still run
# what they can on CPU, so the script itself is exercised everywhere.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
started=$(date +%s)
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo; echo "===== $name (limit ${limit}s) ====="
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then SUMMARY+=("PASS  $name (${dt}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then SUMMARY+=("FAIL  $name: timed out after ${dt}s"); FAILED=1
  else SUMMARY+=("FAIL  $name: exit $rc (${dt}s)"); FAILED=1
  fi
}

# ---------------------------------------------------------------- Ray from .whl/ when missing
if ! "$PY" -c "import ray" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing Ray from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "FAIL: no Ray here and no .whl/ (run ../shared/tools/gpu-wheels.sh in the repository first)"
    exit 1
  fi
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# Ray workers inherit PYTHONPATH, so they import this checkout's ray_metaopt (and Ray from /tmp/site).

step "1 environment" 60 bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  '"$PY"' - <<"EOF"
import platform, sys
import torch, ray, ray_metaopt
print("python", platform.python_version(), "| torch", torch.__version__, "| ray", ray.__version__,
      "| ray_metaopt", ray_metaopt.__version__)
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count(),
      "|", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF'

step "2 multi-GPU placement (whole and 0.5 GPU per trial)" 240 \
  "$PY" tests/tune/test_gpu_placement.py

step "3 CUDA Tune run of the provided trainable" 240 "$PY" - <<'EOF'
import math, tempfile, time
import ray, torch
from ray import tune
from ray_metaopt.tune import metaopt_trainable

cuda = torch.cuda.is_available()
gpus = torch.cuda.device_count() if cuda else 0
ray.init(address="local", num_cpus=8, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
resources = {"cpu": 1, "gpu": 0.5} if cuda else {"cpu": 1}
if not cuda:
    print("SKIP (CUDA parts): no CUDA, the same trials run on CPU")
started = time.time()
with tempfile.TemporaryDirectory() as storage:
    grid = tune.Tuner(
        tune.with_resources(metaopt_trainable, resources),
        param_space={
            "task": tune.grid_search(["teacher_student", "moe"]),
            "meta": tune.grid_search(["plateau", "rl"]),
            # plateau: cut the lr unless val_loss halves between evaluations, so it surely acts
            "meta_config": tune.sample_from(
                lambda spec: {"patience": 0, "threshold": 0.5} if spec.config["meta"] == "plateau" else {}
            ),
            "optimizer_config": {"lr": 3e-3},
            "max_steps": 400 if cuda else 60,
            "eval_interval": 50 if cuda else 20,
            "seed": 0,
        },
        run_config=tune.RunConfig(name="gpu_check", storage_path=storage, verbose=0),
    ).fit()
ok = not grid.errors
for r in grid:
    m = r.metrics
    line = (f"  {m.get('meta/strategy', r.config['meta']):>24} {r.config['task']:<16} device={m.get('device')} "
            f"step={m.get('step')} val_loss={m.get('val_loss', math.nan):.4f} lr={m.get('lr', math.nan):.2e} "
            f"decisions={m.get('meta/num_decisions')} steps/s={m.get('steps_per_second', math.nan):.0f}")
    print(line)
    ok &= (r.error is None and m.get("device") == ("cuda" if cuda else "cpu")
           and math.isfinite(m.get("val_loss", math.nan)) and not m.get("diverged"))
    if r.config["meta"] == "plateau":
        ok &= m.get("meta/num_decisions", 0) >= 1
print(f"4 trials in {time.time() - started:.0f}s: {'OK' if ok else 'FAILED'}", grid.errors or "")
ray.shutdown()
raise SystemExit(0 if ok else 1)
EOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ -f benchmarks/overhead.py ]; then
    step "4 no host sync on non-decision steps (+ wrapper overhead)" 150 \
      "$PY" benchmarks/overhead.py --device cuda --reps 10 --block 20
  else
    step "4 no host sync on non-decision steps" 120 "$PY" - <<'EOF'
import torch
from ray_metaopt import OptimizerWrapper
from ray_metaopt.plateau import PlateauMetaOptimizer
dev = torch.device("cuda")
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(dev)
meta = PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=10)
opt = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), meta)
x, y = torch.randn(128, 64, device=dev), torch.randn(128, 1, device=dev)
synced_on = []
for step in range(40):
    decision = meta.should_update(step)
    torch.cuda.set_sync_debug_mode("default" if decision else "error")
    try:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.update_hyperparameters({"loss": loss.detach()}, step)
        opt.step()
    except RuntimeError as err:
        synced_on.append((step, str(err).splitlines()[0]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
print("host syncs on non-decision steps:", synced_on or "none")
raise SystemExit(1 if synced_on else 0)
EOF
  fi
else
  echo; echo "===== 4 no host sync ====="; echo "SKIP: no CUDA"
  SUMMARY+=("SKIP  4 no host sync on non-decision steps (no CUDA)")
  if [ -f benchmarks/overhead.py ]; then  # still exercise the script's CPU path
    step "4b wrapper overhead on CPU (script smoke run)" 120 "$PY" benchmarks/overhead.py --device cpu --reps 2 --block 5
  fi
fi

step "5 DDP: identical decisions on every rank" 180 \
  "$PY" -m pytest tests/test_distributed.py -q -p no:cacheprovider

echo; echo "===== summary ($(( $(date +%s) - started ))s) ====="
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
