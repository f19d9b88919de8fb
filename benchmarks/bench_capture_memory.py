"""Peak memory and time of TRMTrainer's rollout log-prob capture on plain transformers generation, against GRPOTrainer.

What is measured: one training step, `trainer.train()` with `max_steps=1` (`--max-steps`): with
`steps_per_generation=4` the first step generates the whole generation batch in one `generate` call, then trains on
its first micro-batch (TRL also scores all 32 completions with the old policy), on a model with a
Qwen-size vocabulary (V = 151,936) and a tiny body (`trl_trm.tiny`, hidden 64, 2 layers, widened vocabulary), fp32
on CPU. Set-up of issue 13: generation batch 32 completions (`per_device_train_batch_size=8`,
`steps_per_generation=4`, `num_generations=4`) of exactly L tokens (eos never sampled: `min_new_tokens` is not used,
the tiny tokenizer's eos has probability ~1/V), L = 256 and L = 1024.

Configurations, each in its own fresh process (`--worker`):

* ``GRPO``: `GRPOTrainer` (TRL records no log-probs on this path).
* ``TRM``: `TRMTrainer` (`trm_mode="trm"`), log-probs recorded step by step by :mod:`trl_trm.rollout`.
* ``TRM_output_scores`` (``--with-old``): the previous capture, for reference: `generate(output_scores=True,
  return_dict_in_generate=True)` holding one (B, V) score tensor per step, reduced afterwards with
  `trl_trm.rollout.processed_logprobs`. Only at L = 256 (at 1,024 tokens it needs ~20 GB more).

Per process: ``peak``: growth of the peak resident set during `train()` (`VmHWM` reset through
`/proc/self/clear_refs` just before; a lower bound of the allocations, glibc reuses freed pages), ``time``: the
wall time of `train()`, and ``cpu``: the process's CPU time during `train()` (less sensitive to other load). In the
same process a thread reads `/proc/self/statm` every 10 ms (``generate peak``: the RSS peak while the generation
batch's `_generate` runs, wherever in it the peak is), and glibc's `mallinfo2` is read right after `_generate`
(``heap kept``: bytes freed but kept by the allocator; ~0 unless the heap fragmented, as in issue 23, where the
capture's per-step allocations made the heap grow by B·V·4 bytes a step while no (B, V) tensor stayed alive).

Processes are interleaved (TRM, GRPO, then GRPO, TRM, ...) over ``--repeats`` rounds (at least 3 for a verdict) so
that a change of machine load hits both alike, or with ``--parallel`` each round's TRM and GRPO run at the same time
(same load for both; peak RSS is per process). Every run records the 1-minute load average before and after it.
Medians are reported, but the verdict takes the worst round's TRM / GRPO ratio: issue 23's fragmentation happens in
some processes and not others, and a median over three rounds could hide one. Targets (issue 23): peak <= 1.05x and
time <= 1.05x GRPOTrainer in every round, at V = 151,936, L = 256 and 1,024, at light load. Each worker uses
``--threads`` torch threads (default 1).

Usage::

    .venv/bin/python benchmarks/bench_capture_memory.py                       # L = 256 and 1024, 3 rounds
    .venv/bin/python benchmarks/bench_capture_memory.py --lengths 64 --output /tmp/smoke.json  # ~4 min check
    .venv/bin/python benchmarks/bench_capture_memory.py --lengths 256 --repeats 1 --with-old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

VOCAB = 151_936


def build_model_dir(path: str, vocab: int) -> str:
    from trl_trm.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    model.resize_token_embeddings(vocab)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _old_capture():
    """The capture as it was before the step-by-step recorder: `output_scores=True`, reduced after `generate`."""
    import contextlib

    from trl_trm import rollout

    @contextlib.contextmanager
    def record_sampling_logprobs(model, topk=0):
        recorder = rollout._Recorder(topk)
        original = model.generate

        def generate(*args, **kwargs):
            kwargs.update(output_scores=True, return_dict_in_generate=True)
            out = original(*args, **kwargs)
            recorder.logprobs = rollout.processed_logprobs(out.scores, out.sequences)[0]
            recorder.token_ids = out.sequences[:, out.sequences.size(1) - len(out.scores) :]
            return out.sequences

        model.generate = generate
        try:
            yield recorder
        finally:
            del model.generate

    return record_sampling_logprobs


def worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset

    torch.set_num_threads(spec["threads"])
    from bench_masking import rss_peak_extra_bytes

    from trl_trm import TRMConfig, TRMTrainer

    if spec["config"] == "TRM_output_scores":
        import trl_trm.trainer

        trl_trm.trainer.record_sampling_logprobs = _old_capture()
    common = dict(
        output_dir=spec["output_dir"], use_cpu=True, bf16=False, per_device_train_batch_size=8,
        steps_per_generation=4, num_generations=4, max_completion_length=spec["length"], max_steps=spec["max_steps"],
        learning_rate=1e-6, logging_steps=1, report_to=[], save_strategy="no", seed=0, temperature=1.0,
        gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    dataset = Dataset.from_list([{"prompt": f"{i}+{i % 7}="} for i in range(64)])

    def reward(completions, **kwargs):
        return [float(len(c) % 5) for c in completions]

    if spec["config"] == "GRPO":
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(
            model=spec["model_dir"], reward_funcs=reward, args=GRPOConfig(**common), train_dataset=dataset
        )
    else:
        trainer = TRMTrainer(
            model=spec["model_dir"], reward_funcs=reward, args=TRMConfig(trm_mode="trm", trm_plot=False, **common),
            train_dataset=dataset,
        )  # fmt: skip
    lengths = []
    original = trainer._generate

    def generate(prompts):
        result = original(prompts)
        lengths.extend(len(ids) for ids in result[1])
        return result

    trainer._generate = generate
    probe = RssProbe()
    original_generate = trainer._generate

    def probed_generate(prompts):
        probe.phase = "generate"
        start = time.perf_counter()
        try:
            return original_generate(prompts)
        finally:
            probe.generate_s += time.perf_counter() - start
            probe.heap = heap_info()  # glibc's view at the end of `generate`: in use vs freed but kept
            probe.phase = "after"

    trainer._generate = probed_generate
    timing = {}

    def run():
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
        timing["train_s"] = time.perf_counter() - start
        timing["cpu_s"] = time.process_time() - cpu_start  # this process's CPU time: robust to other load
        return None

    probe.start()
    try:
        peak = rss_peak_extra_bytes(run)
    finally:
        probe.stop()
    return {
        **{k: spec[k] for k in ("config", "length", "threads", "max_steps")},
        "peak_rss_growth_bytes": peak,
        "probe_rss_before_bytes": probe.base,
        "probe_peak_growth_bytes": {phase: value - probe.base for phase, value in probe.peaks.items()},
        "generate_s": probe.generate_s,
        "heap_after_generate": probe.heap,
        "train_s": timing["train_s"],
        "cpu_s": timing["cpu_s"],
        "completions": len(lengths),
        "mean_completion_tokens": statistics.mean(lengths) if lengths else 0,
    }


class RssProbe:
    """A thread reading `/proc/self/statm` every 10 ms: the peak RSS of each phase (``before`` / ``generate`` /
    ``after`` the generation batch's `_generate`), wherever in the phase it happens."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.phase = "before"
        self.peaks: dict[str, int] = {}
        self.generate_s = 0.0
        self.heap: dict | None = None
        self.base = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            phase, value = self.phase, self.rss()
            self.peaks[phase] = max(self.peaks.get(phase, 0), value)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self.base = self.rss()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def heap_info() -> dict | None:
    """glibc `mallinfo2`: bytes in use and bytes freed but kept by the allocator (fragmentation: issue 23), or None
    off glibc."""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (name, ctypes.c_size_t)
                for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
            ]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return {"in_use_bytes": info.uordblks + info.hblkhd, "free_kept_bytes": info.fordblks, "heap_bytes": info.arena}


def _generate_peak(run: dict) -> int:
    """RSS growth at the probe's peak during `_generate` (bytes over the RSS before `train()`)."""
    return run["probe_peak_growth_bytes"].get("generate", 0)


def start_worker(spec: dict) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_worker(spec: dict, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and '"peak_rss_growth_bytes"' in line:
            return json.loads(line)
    raise RuntimeError(f"worker {spec['config']} L={spec['length']} failed:\n{stderr[-3000:]}")


def run_round(specs: list[dict], parallel: bool) -> list[dict]:
    """Run the workers one after the other, or all at once (``parallel``: they then share the same machine load). Each
    run records the 1-minute load average before and after it."""

    def with_load(load_before, run):
        return {**run, "load_average_before": load_before, "load_average_after": os.getloadavg()}

    if not parallel:
        runs = []
        for spec in specs:
            load_before = os.getloadavg()
            runs.append(with_load(load_before, finish_worker(spec, start_worker(spec))))
        return runs
    load_before = os.getloadavg()
    procs = [start_worker(spec) for spec in specs]
    return [with_load(load_before, finish_worker(spec, proc)) for spec, proc in zip(specs, procs, strict=True)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved TRM/GRPO rounds per length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--with-old", action="store_true", help="also the output_scores capture (L = 256 only)")
    parser.add_argument("--max-steps", type=int, default=1, help="optimizer steps; the first one generates")
    parser.add_argument("--parallel", action="store_true", help="run each round's TRM and GRPO at the same time")
    parser.add_argument("--output", default=str(HERE / "results" / "bench_capture_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return {}

    from bench_masking import machine_info

    load_before = os.getloadavg()
    start = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "model"), args.vocab)
        for length in args.lengths:
            configs = ["TRM", "GRPO"]
            for r in range(args.repeats):
                specs = [
                    dict(
                        config=config, length=length, threads=args.threads, model_dir=model_dir,
                        output_dir=os.path.join(tmp, f"out-{config}-{length}-{r}"), max_steps=args.max_steps,
                    )
                    for config in (configs if r % 2 == 0 else configs[::-1])
                ]  # fmt: skip
                for run in run_round(specs, args.parallel):
                    run["round"] = r
                    runs.append(run)
                    print(json.dumps(run), flush=True)
            if args.with_old and length <= 256:
                spec = dict(
                    config="TRM_output_scores", length=length, threads=args.threads, model_dir=model_dir,
                    output_dir=os.path.join(tmp, f"out-old-{length}"), max_steps=args.max_steps,
                )  # fmt: skip
                runs.append(run_round([spec], False)[0])
                print(json.dumps(runs[-1]), flush=True)

    rows = []
    for length in args.lengths:
        med = {}
        for config in ("GRPO", "TRM", "TRM_output_scores"):
            sel = [r for r in runs if r["config"] == config and r["length"] == length]
            if sel:
                med[config] = {
                    "peak_gib": statistics.median(r["peak_rss_growth_bytes"] for r in sel) / 2**30,
                    "generate_peak_gib": statistics.median(_generate_peak(r) for r in sel) / 2**30,
                    "time_s": statistics.median(r["train_s"] for r in sel),
                    "cpu_s": statistics.median(r.get("cpu_s", float("nan")) for r in sel),
                    "n": len(sel),
                }
        row = {"length": length, **med}
        if "GRPO" in med and "TRM" in med:
            row["peak_ratio"] = med["TRM"]["peak_gib"] / med["GRPO"]["peak_gib"]
            row["time_ratio"] = med["TRM"]["time_s"] / med["GRPO"]["time_s"]
            row["cpu_time_ratio"] = med["TRM"]["cpu_s"] / med["GRPO"]["cpu_s"]
            # Per round (its TRM and GRPO run next to each other): the verdict takes the worst round, so one
            # process in three whose heap fragmented (issue 23) cannot hide behind a median.
            rounds = []
            for r in range(args.repeats):
                pair = {x["config"]: x for x in runs if x["length"] == length and x.get("round") == r}
                if "TRM" in pair and "GRPO" in pair:
                    rounds.append(
                        {
                            "round": r,
                            "peak_ratio": pair["TRM"]["peak_rss_growth_bytes"] / pair["GRPO"]["peak_rss_growth_bytes"],
                            "generate_peak_ratio": _generate_peak(pair["TRM"]) / _generate_peak(pair["GRPO"]),
                            "time_ratio": pair["TRM"]["train_s"] / pair["GRPO"]["train_s"],
                            "load_average_1min": [pair[c]["load_average_before"][0] for c in ("GRPO", "TRM")],
                        }
                    )
            row["rounds"] = rounds
            row["worst_peak_ratio"] = max(x["peak_ratio"] for x in rounds)
            row["worst_time_ratio"] = max(x["time_ratio"] for x in rounds)
            row["meets_peak_target_1.05"] = len(rounds) >= 3 and row["worst_peak_ratio"] <= 1.05
            row["meets_time_target_1.05"] = len(rounds) >= 3 and row["worst_time_ratio"] <= 1.05
        rows.append(row)

    gib = 2**30
    print("\nEvery run (peak: VmHWM growth over train(); generate peak: the 10 ms RSS probe during `_generate`;")
    print("heap kept: bytes glibc holds freed after `generate`, ~0 unless the heap fragmented; load: 1-min average)")
    print("| config | L | round | load before | load after | peak GiB | generate peak GiB | heap kept GiB | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        heap = (r.get("heap_after_generate") or {}).get("free_kept_bytes")
        print(
            f"| {r['config']} | {r['length']} | {r.get('round', '-')} | {r['load_average_before'][0]:.2f} | "
            f"{r['load_average_after'][0]:.2f} | {r['peak_rss_growth_bytes'] / gib:.2f} | "
            f"{_generate_peak(r) / gib:.2f} | {'-' if heap is None else f'{heap / gib:.2f}'} | {r['train_s']:.1f} |"
        )
    print(
        "\n| L | GRPO peak GiB | TRM peak GiB | peak ratio (median, worst round) | GRPO s | TRM s "
        "| time ratio (median, worst round) | CPU-time ratio | TRM generate peak GiB | output_scores peak GiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        old = row.get("TRM_output_scores", {}).get("peak_gib")
        print(
            f"| {row['length']} | {row['GRPO']['peak_gib']:.2f} | {row['TRM']['peak_gib']:.2f} | "
            f"{row['peak_ratio']:.3f}, {row['worst_peak_ratio']:.3f} | {row['GRPO']['time_s']:.1f} | "
            f"{row['TRM']['time_s']:.1f} | {row['time_ratio']:.3f}, {row['worst_time_ratio']:.3f} | "
            f"{row['cpu_time_ratio']:.3f} | {row['TRM']['generate_peak_gib']:.2f} | "
            f"{'-' if old is None else f'{old:.2f}'} |"
        )
        print(
            f"  L={row['length']}: peak target <= 1.05x in every round: {row['meets_peak_target_1.05']}; "
            f"time target <= 1.05x in every round: {row['meets_time_target_1.05']} ({len(row['rounds'])} rounds)"
        )
    result = {
        "benchmark": "bench_capture_memory",
        "setup": {
            "vocab": args.vocab,
            "hidden_size": 64,
            "num_layers": 2,
            "generation_batch": 32,
            "per_device_train_batch_size": 8,
            "steps_per_generation": 4,
            "num_generations": 4,
            "dtype": "float32",
            "measured": f"trainer.train() with max_steps={args.max_steps} (the first generates 32), fresh process",
            "peak": "VmHWM growth during train() (reset via /proc/self/clear_refs)",
            "generate_peak": "RSS probe (/proc/self/statm every 10 ms) during the generation batch's _generate",
            "heap_after_generate": "glibc mallinfo2 right after _generate: in use, and freed but kept (fragmentation)",
            "targets": "peak <= 1.05x and time <= 1.05x GRPOTrainer in every round (issue 23), at light load",
        },  # fmt: skip
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - start,
        "rows": rows,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    main()
