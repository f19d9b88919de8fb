#!/usr/bin/env bash
# GPU check for trl_trm (issue 13, item 5): one CUDA GPU, torch + transformers (+ accelerate, peft, pytest)
# preinstalled, NO network. Under 8 minutes: the parts' time limits add up to 480 s (a part past its limit is
# stopped and recorded as failed, exit code 124; the others still run). Writes every number to one JSON file,
# $GPU_CHECK_OUT/gpu_check.json (default benchmarks/results/gpu/; dry run: benchmarks/results/gpu-dry-run/, git-ignored),
# plus each part's own JSON next to it.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # CPU dry run (CI: `make gpu-check-dry`): every part at toy
#                                                      # size on CPU with the project's .venv; prints what it would
#                                                      # run on a GPU; skips nothing
# Parts:
#   1. the `gpu`-marked tests (tests/test_gpu.py: masking on CUDA vs CPU, the trm_exact fused-head capture on CUDA vs
#      CPU, a trm_exact training step on CUDA vs CPU)
#   2. benchmarks/bench_masking.py --device cuda (every mode, (64, 1024) ... (512, 16384), fp32 and bf16)
#   3. benchmarks/bench_trainer_overhead.py --preset gpu-100m (~109M parameters, bf16 weights, CUDA): TRM/GRPO step
#      time, `trm` and `trm_exact` (k = 20)
#   4. benchmarks/gpu_mismatch.py: the transformers-path mismatch as trm/ metrics (fp32, bf16 autocast, bf16 weights)
#
# Wheels (trl, datasets and this package do not exist on the GPU machine and it has no network). Build them on a
# machine with PyPI access, into benchmarks/wheels/ (git-ignored; travels with the working tree, 64 MiB in all):
#
#   python -m pip wheel --no-deps -w benchmarks/wheels .            # this package (pure Python, ~0.1 MB)
#   python -m pip download --no-deps -d benchmarks/wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19 fsspec huggingface-hub "pyyaml>=6" xxhash \
#       --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
#
# That set is ~4.2 MB (measured). datasets also needs pyarrow (>= 24 for datasets 5.2: 55 MB as a cp312 wheel) and
# pandas (12 MB): with them the wheels are 69 MB, over the 64 MiB the tree may carry (the tree itself is ~8 MB).
# So the check assumes the GPU machine has pyarrow and pandas already (common next to transformers); if
# `pip install` below names them as missing, add `pyarrow pandas` to the download line and carry the wheels another
# way. (datasets 4.7, the oldest trl 1.16 accepts, takes pyarrow >= 21, 43 MB, but needs fsspec[http] and the
# aiohttp stack, so it does not fit either.) --python-version/--platform: the GPU machine's Python (3.12 on the lent
# H200 machines) decides the binary wheels (pyyaml, xxhash, pyarrow, pandas). `pip install --no-index` takes
# everything else (torch, transformers, accelerate, numpy, tqdm, ...) from the preinstalled site-packages; when it
# names another missing distribution, download that one into the folder as well (`du -sh benchmarks/wheels`).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "$DRY" = 1 ]; then OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu-dry-run}"; else OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu}"; fi
WHEELS="${GPU_CHECK_WHEELS:-benchmarks/wheels}"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_DISABLED=true TRL_EXPERIMENTAL_SILENCE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$OUT"
START=$(date +%s)
PARTS_FILE="$OUT/parts.jsonl"
: > "$PARTS_FILE"
FAILED=0

say() { echo "== [$(( $(date +%s) - START )) s] $*"; }

# run_part NAME TIMEOUT_S GPU_COMMAND -- DRY_COMMAND: runs one part (the dry command in a dry run, after printing
# the GPU command), records its exit code and time; a failing part does not stop the others.
run_part() {
    local name="$1" limit="$2"; shift 2
    local gpu=() dry=()
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do gpu+=("$1"); shift; done
    shift
    dry=("$@")
    local cmd=("${gpu[@]}")
    if [ "$DRY" = 1 ]; then
        limit=$(( limit * 4 ))  # the limits are sized for the GPU; a shared CI CPU needs more for the toy sizes
        say "$name: on a GPU this part runs: ${gpu[*]}"
        cmd=("${dry[@]}")
    fi
    say "$name: running: ${cmd[*]}"
    local t0 rc
    t0=$(date +%s)
    timeout "$limit" "${cmd[@]}"
    rc=$?
    [ "$rc" -eq 0 ] || FAILED=1
    printf '{"part": "%s", "rc": %d, "seconds": %d, "dry_run": %s, "command": "%s"}\n' \
        "$name" "$rc" "$(( $(date +%s) - t0 ))" "$([ "$DRY" = 1 ] && echo true || echo false)" "${cmd[*]}" \
        >> "$PARTS_FILE"
    say "$name: exit code $rc"
}

# ---------------------------------------------------------------------------------------------- environment
if [ "$DRY" = 1 ]; then
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "dry run: $PY missing; run \`make\` first" >&2; exit 2; }
    say "DRY RUN on CPU with $PY: every part at toy size. On a GPU machine the script would first check CUDA, then" \
        "install trl, datasets and trl-trm with: $PY -m pip install --no-index --find-links $WHEELS trl-trm" \
        "(into .venv-gpu, a venv with the system site-packages)."
    TEST_DEVICE=cpu
    BENCH_DEVICE=cpu
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: torch.cuda.is_available() is False')" || exit 2
    if ! "$PY" -c "import trl, datasets, trl_trm" 2>/dev/null; then
        [ -d "$WHEELS" ] || { echo "trl/datasets/trl_trm missing and no $WHEELS folder: build the wheels (see the top of this script)" >&2; exit 2; }
        say "installing from $WHEELS (no index) into .venv-gpu (system site-packages visible)"
        "$PY" -m venv --system-site-packages .venv-gpu || exit 2
        PY=.venv-gpu/bin/python
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" trl-trm || {
            echo "pip could not install from $WHEELS: download the distribution it names into $WHEELS (see the top)" >&2
            exit 2
        }
    fi
    TEST_DEVICE=cuda
    BENCH_DEVICE=cuda
fi
"$PY" - <<'PY' > "$OUT/environment.json"
import json, platform, torch, transformers
try:
    import trl
    trl_version = trl.__version__
except Exception as error:  # reported, not fatal here: the parts fail with their own message
    trl_version = f"not importable: {error}"
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    "trl": trl_version, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
}))
PY
say "environment: $(cat "$OUT/environment.json")"

# ---------------------------------------------------------------------------------------------- parts
run_part gpu_tests 120 \
    env TRM_GPU_TEST_DEVICE=cuda "$PY" -m pytest -q -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml" -- \
    env TRM_GPU_TEST_DEVICE=cpu "$PY" -m pytest -q -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml"

run_part bench_masking 60 \
    "$PY" benchmarks/bench_masking.py --device cuda --repeats 20 --output "$OUT/bench_masking.json" -- \
    "$PY" benchmarks/bench_masking.py --device cpu --sizes small --repeats 3 --modes trm trm_exact \
        --output "$OUT/bench_masking.json"

run_part bench_trainer_overhead_trm 110 \
    "$PY" benchmarks/bench_trainer_overhead.py --preset gpu-100m --steps 12 --warmup 2 \
        --output "$OUT/bench_trainer_overhead_trm.json" -- \
    "$PY" benchmarks/bench_trainer_overhead.py --preset gpu-dry-run --steps 2 --warmup 1 \
        --output "$OUT/bench_trainer_overhead_trm.json"

run_part bench_trainer_overhead_trm_exact 110 \
    "$PY" benchmarks/bench_trainer_overhead.py --preset gpu-100m --mode trm_exact --topk 20 --steps 12 --warmup 2 \
        --output "$OUT/bench_trainer_overhead_trm_exact.json" -- \
    "$PY" benchmarks/bench_trainer_overhead.py --preset gpu-dry-run --mode trm_exact --topk 20 --steps 2 --warmup 1 \
        --output "$OUT/bench_trainer_overhead_trm_exact.json"

run_part mismatch 80 \
    "$PY" benchmarks/gpu_mismatch.py --device cuda --output "$OUT/mismatch.json" -- \
    "$PY" benchmarks/gpu_mismatch.py --device cpu --vocab 0 --hidden 64 --layers 2 --steps 2 --completion 16 \
        --output "$OUT/mismatch.json"

# ---------------------------------------------------------------------------------------------- one JSON
"$PY" - "$OUT" "$DRY" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None

summary = {"dry_run": dry, "environment": load("environment.json"),
           "parts": [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()]}
junit = out / "gpu_tests.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
masking = load("bench_masking.json")
if masking:
    summary["masking"] = [{k: r.get(k) for k in ("mode", "dtype", "B", "T", "median_ms", "x_floor", "temporaries")}
                          for r in masking["rows"] if "error" not in r]
for mode in ("trm", "trm_exact"):
    bench = load(f"bench_trainer_overhead_{mode}.json")
    if bench:
        summary[f"trainer_overhead_{mode}"] = {k: bench.get(k) for k in ("ratio_wall", "ratio_wall_paired_median",
                                                                          "ratio_step_time", "target_ratio", "target_met")}
        summary[f"trainer_overhead_{mode}"]["model"] = bench["config"]["model"]
mismatch = load("mismatch.json")
if mismatch:
    summary["mismatch"] = {name: s["max_over_steps"] for name, s in mismatch["settings"].items()}
    summary["mismatch_model_parameters"] = mismatch["model"].get("parameters")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "masking"}, indent=2))
PY
say "wrote $OUT/gpu_check.json; total $(( $(date +%s) - START )) s; $([ "$FAILED" = 0 ] && echo 'every part passed' || echo 'a part FAILED (see parts.jsonl)')"
exit "$FAILED"
