"""Time and peak extra memory of `trl_trm.masking.compute_trust_region_mask`, every mode, CPU.

Inputs (per size (B, T) and input dtype float32 / bf16), built the way TRL hands them to the trainer:

* ``logp_roll = -U(0, 5)`` (rollout log-probs), ``logp_theta = logp_roll + N(0, 0.02^2)`` (a small mismatch),
  both cast to the input dtype (for bf16 the rounding adds its own mismatch);
* ``completion_mask``: right-padded int64 (TRL's dtype) with random lengths in [1, T]; the padding positions of both
  log-prob tensors hold 0 (what TRL pads with).

Timing. Every repetition times, one after the other, the bandwidth floor and each mode once (so a change of load
on the machine hits all of them alike); each figure is the median over ``--repeats`` repetitions, after two
warm-up calls of each. The floor is one read of every input: ``logp_theta.sum(); logp_roll.sum();
completion_mask.sum()`` (``x floor`` = mode median / floor median; target: <= 3). The time of one ``clone`` of
the three inputs (read + write) is recorded in the JSON as a second reference.

Peak extra memory. Torch's CPU tensors are allocated through c10's CPU allocator, which ``tracemalloc`` does not
see. With ``torch.profiler.profile(profile_memory=True)``, c10 reports every CPU allocation and free made inside
the profiled window as a ``[memory]`` event with its signed size in bytes. The script replays those events in
time order (running sum of ``Bytes``) and reports the maximum: the peak of *live torch CPU bytes allocated by the
call*, at byte granularity, independent of glibc's heap/mmap behaviour. It includes what the call returns (the
(B, T) float ``weights`` and the O(B) statistics, reported separately as ``retained``), since the caller holds
them. ``temporaries = peak_extra_bytes / (B * T * 4)``: the peak as a number of full (B, T) float32 tensors
(target: <= 4). A calibration run on a known allocation pattern checks the method at start-up.

As a cross-check, the growth of the process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset
before the call by writing ``5`` to ``/proc/self/clear_refs``; page granularity, 4 KiB) is recorded in the JSON
as ``rss_extra_mib``. It is a lower bound only: glibc serves smaller blocks (the (B, T) bool temporaries, and
everything at the small sizes) from its heap, which keeps freed pages resident, so reusing them does not raise the
peak RSS (measured here: 0 MiB at (64, 1024), 128 MiB against the profiler's 160 MiB at (512, 16384)).

``--compiled`` also times ``torch.compile(compute_trust_region_mask)``, a reference for what a fused
implementation of the same math would cost (compilation happens in the warm-up); the targets apply to the eager
function, which is what the trainer calls.

Usage::

    .venv/bin/python benchmarks/bench_masking.py                 # all sizes (about 5-8 min on 2 cores)
    .venv/bin/python benchmarks/bench_masking.py --sizes small   # (64, 1024) only, a quick check
    .venv/bin/python benchmarks/bench_masking.py --repeats 30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trl_trm.row_blocks as row_blocks  # noqa: E402
from benchmarks.masking_references import trl_sequence_mask, trl_sequence_mask_with_metrics  # noqa: E402
from trl_trm.masking import TRM_MODES, compute_trust_region_mask  # noqa: E402

SIZES: list[tuple[int, int]] = [(64, 1024), (256, 4096), (256, 8192), (512, 16384)]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
TARGET_X_FLOOR = 3.0
TARGET_TEMPORARIES = 4.0
KL_MODES = ("trm_exact",)  # modes fed the (B, T) `kl_tok` input as well
# TRL 1.16's `sequence_mask` correction, alone and with the metrics TRL logs beside it (benchmarks/masking_references.py)
REFERENCES: dict[str, Callable] = {
    "sequence_mask": trl_sequence_mask,
    "sequence_mask+metrics": trl_sequence_mask_with_metrics,
}
TARGET_VS_TRL = 2.0  # `trm` (every statistic) at least 2x faster than TRL's block with its metrics
TARGET_TRM_MS = 100.0  # `trm` at (512, 16384), float32, 1 torch thread


# ---------------------------------------------------------------------------------------------------- inputs
def make_inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(logp_theta, logp_roll, completion_mask, kl_tok) of shape (B, T): see the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    logp_roll = -5.0 * torch.rand(batch, length, generator=gen)
    logp_theta = logp_roll + 0.02 * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T) int64, right-padded
    logp_roll = torch.where(mask.bool(), logp_roll, 0.0).to(dtype)
    logp_theta = torch.where(mask.bool(), logp_theta, 0.0).to(dtype)
    # per-token KL for `trm_exact` (what `topk_token_kl` returns: float32, >= 0, ~ 0.5 * 0.02^2 here)
    kl_tok = torch.where(mask.bool(), 2e-4 * torch.rand(batch, length, generator=gen), 0.0)
    return logp_theta.contiguous(), logp_roll.contiguous(), mask.contiguous(), kl_tok.contiguous()


# ---------------------------------------------------------------------------------------------------- memory
def profiled_peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, retained): the peak of live torch CPU bytes allocated inside ``fn()`` and those still live after it
    returned (held by its result), replayed from the profiler's ``[memory]`` events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    live = peak = 0
    for event in memory:
        live += int(event["args"]["Bytes"])
        peak = max(peak, live)
    del result
    return peak, live


def rss_peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Growth of the peak resident set during ``fn()`` (VmHWM reset first); None where /proc does not allow it."""

    def status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kib("VmRSS")
        result = fn()
        peak = status_kib("VmHWM")
    except (OSError, KeyError):
        return None
    del result
    return (peak - before) * 1024


def calibrate_memory_method() -> None:
    """Check the profiler replay on a known pattern: three live 4 MB tensors at the peak, one retained."""
    x = torch.randn(1_000_000)

    def pattern() -> torch.Tensor:
        a = x * 2
        b = a + 1
        c = a * b  # a, b, c live: 12 MB
        del a, b
        return c.exp()  # c and the result live: 8 MB; the result (4 MB) is retained

    profiled_peak_bytes(pattern)  # warm-up (the profiler's own first-use allocations)
    peak, retained = profiled_peak_bytes(pattern)
    if not (12_000_000 <= peak < 12_100_000 and 4_000_000 <= retained < 4_100_000):
        raise RuntimeError(f"memory method calibration failed: peak={peak} retained={retained} (want 12e6, 4e6)")


def all_threads(*args, **kwargs):
    """`compute_trust_region_mask` with its CPU block loop on all of the caller's torch threads (the loop before it
    ran on one thread; results are bit-identical): the `--all-threads` reference."""
    saved = row_blocks._CPU_BLOCK_THREADS
    row_blocks._CPU_BLOCK_THREADS = None
    try:
        return compute_trust_region_mask(*args, **kwargs)
    finally:
        row_blocks._CPU_BLOCK_THREADS = saved


# ---------------------------------------------------------------------------------------------------- timing
DEVICE = torch.device("cpu")  # --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def cuda_peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, retained) CUDA bytes allocated by ``fn()`` beyond those live before it (the caching allocator's
    statistics: exact, like the CPU profiler replay)."""
    _sync()
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    result = fn()
    _sync()
    peak, retained = torch.cuda.max_memory_allocated(DEVICE) - base, torch.cuda.memory_allocated(DEVICE) - base
    del result
    return peak, retained


def timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def run_case(
    batch: int,
    length: int,
    dtype_name: str,
    repeats: int,
    variants: tuple[str, ...] = ("eager",),
    modes: list[str] | None = None,
    warmup: int = 2,
    references: bool = True,
) -> list[dict]:
    """Time the floors and every (variant, mode) (interleaved) and measure each one's peak extra memory."""
    logp_theta, logp_roll, mask, kl_tok = (t.to(DEVICE) for t in make_inputs(batch, length, DTYPES[dtype_name]))
    base_inputs = (logp_theta, logp_roll, mask)
    impls = {"eager": compute_trust_region_mask}
    if "compiled" in variants:  # one graph per (mode, dtype, shape): dynamic=False, compiled during the warm-up
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):  # every graph compiled, none falls back to eager
                setattr(torch._dynamo.config, name, 4096)
        impls["compiled"] = torch.compile(compute_trust_region_mask, dynamic=False)
    if "all_threads" in variants:
        impls["all_threads"] = all_threads

    def floor_read(extra: tuple[torch.Tensor, ...] = ()) -> Callable[[], object]:
        return lambda: [t.sum() for t in base_inputs + extra]

    def floor_clone(extra: tuple[torch.Tensor, ...] = ()) -> Callable[[], object]:
        return lambda: [t.clone() for t in base_inputs + extra]

    def case_fn(variant: str, mode: str) -> Callable[[], object]:
        if variant == "trl":  # a TRL 1.16 reference block (benchmarks/masking_references.py)
            return lambda: REFERENCES[mode](logp_theta, logp_roll, mask)
        kwargs = {"kl_tok": kl_tok} if mode in KL_MODES else {}
        return lambda: impls[variant](logp_theta, logp_roll, mask, mode=mode, **kwargs)

    fns: dict = {"floor_read": floor_read(), "floor_clone": floor_clone()}
    if any(mode in KL_MODES for mode in (modes or TRM_MODES)):  # the floor of a mode that also reads kl_tok
        fns.update({"floor_read+kl": floor_read((kl_tok,)), "floor_clone+kl": floor_clone((kl_tok,))})
    cases = [(variant, mode) for variant in impls for mode in (modes or TRM_MODES)]
    if references:  # timed in the same interleaved rounds as the modes
        cases += [("trl", name) for name in REFERENCES]
    errors: dict[tuple[str, str], str] = {}
    for case in cases:
        try:
            timed(case_fn(*case))
        except (TypeError, ValueError) as error:  # a mode this script does not know how to feed
            errors[case] = f"{type(error).__name__}: {error}"
            continue
        fns[case] = case_fn(*case)
    for fn in fns.values():
        for _ in range(warmup):
            timed(fn)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    full_f32 = batch * length * 4
    rows = []
    for case in cases:
        variant, mode = case
        row: dict = {"mode": mode, "variant": variant, "dtype": dtype_name, "B": batch, "T": length}
        row["repeats"] = repeats
        if case in errors:
            rows.append(row | {"error": errors[case]})
            continue
        suffix = "+kl" if mode in KL_MODES else ""
        inputs = base_inputs + ((kl_tok,) if suffix else ())
        floor = statistics.median(times["floor_read" + suffix])
        clone = statistics.median(times["floor_clone" + suffix])
        if DEVICE.type == "cuda":
            peak, retained = cuda_peak_bytes(case_fn(*case))
            rss = None
        else:
            profiled_peak_bytes(case_fn(*case))  # first profiled call of this case: profiler warm-up
            peak, retained = profiled_peak_bytes(case_fn(*case))
            rss = rss_peak_extra_bytes(case_fn(*case))
        median = statistics.median(times[case])
        row.update(
            {
                "inputs": "logp_theta, logp_roll, mask" + (", kl_tok" if suffix else ""),
                "median_ms": median * 1e3,
                "min_ms": min(times[case]) * 1e3,
                "floor_read_ms": floor * 1e3,
                "floor_clone_ms": clone * 1e3,
                "x_floor": median / floor,
                "x_clone": median / clone,
                "input_mib": sum(t.numel() * t.element_size() for t in inputs) / MIB,
                "peak_extra_mib": peak / MIB,
                "retained_mib": retained / MIB,
                "temporaries": peak / full_f32,
                "rss_extra_mib": None if rss is None else rss / MIB,
            }
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- load
SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def start_load(n: int) -> list[subprocess.Popen]:
    """``n`` competing processes, each a busy loop pinned to one core (cores 0, 1, ... in turn): the controlled load of
    ``--load``. They run until :func:`stop_load`."""
    cores = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(cores[i % len(cores)])]) for i in range(n)]
    time.sleep(0.5)  # let them start spinning
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


# ---------------------------------------------------------------------------------------------------- report
# Every module whose code `compute_trust_region_mask` runs (the facade `masking.py` only re-exports them), so the
# recorded hash changes whenever the timed code does.
MASK_CODE = ("masking.py", "masks.py", "row_blocks.py", "diagnostics.py", "modes.py", "estimator.py")


def mask_code_sha256() -> str:
    """sha256 over the mask's modules, in the order of :data:`MASK_CODE` (name and bytes of each)."""
    digest = hashlib.sha256()
    for name in MASK_CODE:
        digest.update(name.encode() + b"\0" + (ROOT / "trl_trm" / name).read_bytes())
    return digest.hexdigest()


def vs_trl_rows(rows: list[dict]) -> list[dict]:
    """Per (dtype, B, T): `trm` (every statistic) against TRL 1.16's `sequence_mask` block, alone and with its
    metrics, from the same interleaved rounds."""
    by_case = {(r["variant"], r["mode"], r["dtype"], r["B"], r["T"]): r for r in rows if "error" not in r}
    out = []
    for (variant, mode, dtype, b, t), r in by_case.items():
        trl = by_case.get(("trl", "sequence_mask", dtype, b, t))
        trl_metrics = by_case.get(("trl", "sequence_mask+metrics", dtype, b, t))
        if variant != "eager" or mode != "trm" or trl is None or trl_metrics is None:
            continue
        out.append(
            {
                "dtype": dtype,
                "B": b,
                "T": t,
                "trm_ms": r["median_ms"],
                "floor_ms": r["floor_read_ms"],
                "trl_sequence_mask_ms": trl["median_ms"],
                "trl_sequence_mask_metrics_ms": trl_metrics["median_ms"],
                "speedup_vs_trl_metrics": trl_metrics["median_ms"] / r["median_ms"],
                "speedup_vs_trl": trl["median_ms"] / r["median_ms"],
            }
        )
    return out


def vs_trl_table(rows: list[dict]) -> str:
    out = "| dtype | B | T | `trm`, every statistic ms (x floor) | TRL `sequence_mask` ms | TRL + its metrics ms "
    out += "| TRL + metrics / `trm` |\n|---|---:|---:|---:|---:|---:|---:|\n"
    for r in rows:
        flag = "" if r["speedup_vs_trl_metrics"] >= TARGET_VS_TRL else " ✗"
        out += (
            f"| {r['dtype']} | {r['B']} | {r['T']} | {r['trm_ms']:.1f} ({r['trm_ms'] / r['floor_ms']:.1f}) "
            f"| {r['trl_sequence_mask_ms']:.1f} | {r['trl_sequence_mask_metrics_ms']:.1f} "
            f"| {r['speedup_vs_trl_metrics']:.2f}{flag} |\n"
        )
    return out


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mask_code_sha256": mask_code_sha256(),
        "mask_code_files": list(MASK_CODE),
        "device": str(DEVICE),
        "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
    }


def markdown_table(rows: list[dict]) -> str:
    header = "| mode | dtype | B | T | median ms | x floor | peak extra MiB | temporaries |\n"
    header += "|---|---|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['mode']} ({r['variant']}) | {r['dtype']} | {r['B']} | {r['T']} | not run: {r['error'][:60]} | | | |"
            )
            continue
        x_flag = "" if r["x_floor"] <= TARGET_X_FLOOR else " ✗"
        t_flag = "" if r["temporaries"] <= TARGET_TEMPORARIES else " ✗"
        mode = {"eager": r["mode"], "trl": f"TRL 1.16 {r['mode']}"}.get(r["variant"], f"{r['mode']} ({r['variant']})")
        x_flag = x_flag if r["variant"] == "eager" else ""
        lines.append(
            f"| {mode} | {r['dtype']} | {r['B']} | {r['T']} | {r['median_ms']:.2f} | {r['x_floor']:.1f}{x_flag} "
            f"| {r['peak_extra_mib']:.1f} | {r['temporaries']:.2f}{t_flag} |"
        )
    return header + "\n".join(lines)


def floor_table(rows: list[dict]) -> str:
    seen: dict[tuple, dict] = {}
    for r in rows:
        if "error" not in r:
            seen.setdefault((r["dtype"], r["B"], r["T"], r["inputs"]), r)
    out = "| dtype | B | T | inputs read | MiB | read ms | clone ms | read GB/s |\n"
    out += "|---|---:|---:|---|---:|---:|---:|---:|\n"
    for (dtype, b, t, inputs), r in seen.items():
        gbps = r["input_mib"] * MIB / (r["floor_read_ms"] / 1e3) / 1e9
        out += (
            f"| {dtype} | {b} | {t} | {inputs} | {r['input_mib']:.1f} | {r['floor_read_ms']:.2f} "
            f"| {r['floor_clone_ms']:.2f} | {gbps:.1f} |\n"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", choices=["small", "all", "large"], default="all", help="small: (64, 1024) only; large: the largest"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time torch.compile(compute_trust_region_mask) (a reference for a fused implementation; "
        "compilation happens in the warm-up and is not timed; not a target of this benchmark)",
    )
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="also time the block loop on all torch threads (as before it ran on one), interleaved with the default",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per case (after 2 warm-ups)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the whole run (the references included; default: torch's). The issue's "
        "protocol is --threads 1",
    )
    parser.add_argument(
        "--no-references",
        action="store_true",
        help="do not time TRL 1.16's sequence_mask block (alone and with its metrics) beside the modes",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        help="competing processes during the run, each a Python busy loop pinned to one core (0, 1, ...): a "
        "controlled load (default 0: none)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda[:N]: CUDA times synchronise around each call, memory from torch.cuda statistics",
    )
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=list(TRM_MODES), help="only these modes (default: all)"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=None, choices=list(DTYPES), help="only these input dtypes (default: all)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON path (default: results/bench_masking.json for all sizes, bench_masking_<sizes>[_compiled].json "
        "otherwise, so a quick check never overwrites the full results)",
    )
    args = parser.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False on this machine.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if DEVICE.type == "cpu":
        calibrate_memory_method()
    sizes = {"small": SIZES[:1], "all": SIZES, "large": SIZES[-1:]}[args.sizes]
    variants = ("eager",) + (("compiled",) if args.compiled else ()) + (("all_threads",) if args.all_threads else ())
    if args.output is None:
        stem = (
            "bench_masking"
            + ("" if args.sizes == "all" else f"_{args.sizes}")
            + ("_compiled" if args.compiled else "")
            + ("_all_threads" if args.all_threads else "")
            + (f"_load{args.load}" if args.load else "")
            + (f"_threads{args.threads}" if args.threads is not None else "")
            + ("" if DEVICE.type == "cpu" else "_cuda")
            + ("" if args.modes is None else "_" + "-".join(args.modes))
        )
        args.output = RESULTS / f"{stem}.json"
    load_before = os.getloadavg()
    load_procs = start_load(args.load)
    start = time.perf_counter()
    rows: list[dict] = []
    try:
        for batch, length in sizes:
            for dtype_name in args.dtypes or DTYPES:
                print(f"... B={batch} T={length} {dtype_name}", file=sys.stderr, flush=True)
                rows.extend(
                    run_case(
                        batch,
                        length,
                        dtype_name,
                        args.repeats,
                        variants,
                        args.modes,
                        references=not args.no_references,
                    )
                )
    finally:
        stop_load(load_procs)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()

    info = machine_info()
    measured = [r for r in rows if "error" not in r and r["variant"] == "eager"]
    met_x = all(r["x_floor"] <= TARGET_X_FLOOR for r in measured)
    met_t = all(r["temporaries"] <= TARGET_TEMPORARIES for r in measured)
    print(
        f"\n## compute_trust_region_mask, {info['gpu'] or 'CPU'} ({info['cpu_model']}, {info['torch_threads']} threads, "
        f"torch {info['torch_version']})"
    )
    print(
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; {args.repeats} repeats; "
        f"controlled load: {args.load} busy process(es) pinned to one core each; "
        f"{elapsed:.0f} s\n"
    )
    print(markdown_table(rows))
    print("\nBandwidth floor (one read of each input; int64 mask; `trm_exact` also reads kl_tok):\n")
    print(floor_table(rows))
    print(f"target x floor <= {TARGET_X_FLOOR} (eager): {'met' if met_x else 'NOT met'} (✗ marks a miss)")
    side = vs_trl_rows(rows)
    met_trl = bool(side) and all(r["speedup_vs_trl_metrics"] >= TARGET_VS_TRL for r in side)
    largest = [r for r in side if (r["B"], r["T"]) == SIZES[-1] and r["dtype"] == "float32"]
    met_ms = None if not largest else largest[0]["trm_ms"] <= TARGET_TRM_MS
    if side:
        print("\n`trm` (every statistic) beside TRL 1.16's `sequence_mask` block, same interleaved rounds:\n")
        print(vs_trl_table(side))
        print(f"target >= {TARGET_VS_TRL}x faster than TRL's block with metrics: {'met' if met_trl else 'NOT met'}")
    if met_ms is not None:
        threads = "1 thread" if torch.get_num_threads() == 1 else f"{torch.get_num_threads()} threads (target is at 1)"
        print(
            f"target `trm` <= {TARGET_TRM_MS:.0f} ms at {SIZES[-1]} float32, {threads}: {'met' if met_ms else 'NOT met'}"
        )
    print(f"target temporaries <= {TARGET_TEMPORARIES} (eager): {'met' if met_t else 'NOT met'}")

    report = {
        "benchmark": "compute_trust_region_mask",
        "machine": info,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "elapsed_s": elapsed,
        "repeats": args.repeats,
        "controlled_load_processes": args.load,
        "memory_method": "torch.profiler profile_memory=True, replay of [memory] events (bytes); RSS VmHWM cross-check"
        if DEVICE.type == "cpu"
        else "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before",
        "floor": "median time of .sum() of each input: logp_theta, logp_roll, completion_mask (int64), + kl_tok for "
        "trm_exact",
        "targets": {
            "x_floor": TARGET_X_FLOOR,
            "temporaries": TARGET_TEMPORARIES,
            "vs_trl_metrics": TARGET_VS_TRL,
            "trm_ms_largest_float32": TARGET_TRM_MS,
        },
        "targets_met": {
            "x_floor": met_x,
            "temporaries": met_t,
            "vs_trl_metrics": met_trl,
            "trm_ms_largest_float32": met_ms,
        },
        "vs_trl": side,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
