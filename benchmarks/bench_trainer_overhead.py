"""Per-step overhead of `TRMTrainer` (trm_mode="trm", every `trm/` metric logged) over TRL's `GRPOTrainer`, CPU.

Both trainers get the same model (a randomly initialised 4-layer, hidden-256 Qwen2 built locally with
`trl_trm.tiny`, saved once to a temporary directory and loaded by each), the same data (the demo's string-reversal
prompts and reward), the same seed and the same configuration: ``use_cpu=True, bf16=True`` (bf16 autocast in
training against fp32 sampling scores: a real rollout/training mismatch for TRM), ``per_device_train_batch_size=8,
num_generations=4, max_completion_length=128``, no gradient checkpointing, ``logging_steps=1``. GRPO runs with
TRL's own correction off (``vllm_importance_sampling_correction=False``; there is no vLLM here anyway), so the
only difference is TRM.

Method: interleaved steps. Each trainer runs one uninterrupted ``train()`` in its own (spawned) process, and the
parent makes them take turns step by step (A, B, A, B, ...): at every ``on_step_begin`` a callback tells the parent
"yield" and blocks until it is told "go", so exactly one trainer works at a time, and everything it does for a
step (generation, loss, backward, optimizer step, logging, fetching the next batch) happens within its turn. A
change of load on the machine therefore hits both alike. Separate processes, not threads: with the two trainers
in two threads of one process, every step of both took about twice as long as a single trainer's (1.4 s against
0.7 s here), and the last step, run after the other thread had exited, was back at 0.7 s. The likely cause: each
thread gets its own OpenMP team, and with 4 OpenMP threads on 2 cores libgomp throttles its spin-waiting. Two
processes keep each trainer in the regime of a single run. Per step it records

* ``wall``: the length of the trainer's turn (the whole step);
* ``step_time``: TRL's own metric (the time in ``training_step``: generation, scoring, loss and backward; not the
  optimizer step), read from ``log_history``;
* wrapper timers around ``model.generate`` and ``_generate_single_turn`` (both trainers), and for TRM around
  ``_trm_apply`` (mask, metrics gather and reduction, advantage scaling), ``_trm_mask``, ``_trm_log`` and
  ``trl_trm.rollout._reduce_step`` (each generation step's (B, V) scores to the sampled token's log-prob).

Completion length: the random model often samples EOS early (in a trial, 25-60 % of completions reached 128
tokens, mean ~90), which makes the step time follow random lengths. Earlier runs fixed the length with
``generation_kwargs={"min_new_tokens": 128}``; TRMTrainer now refuses sampler settings it cannot reproduce on π_θ
(docs/samplers.md), `min_new_tokens` among them, so lengths follow the model's EOS (the table prints the mean
lengths of both trainers; with V = 151,936 a random model almost never samples EOS). ``--allow-eos`` is kept for
compatibility and has no effect.

The first ``--warmup`` steps of each trainer are discarded; the figures are medians over the remaining steps. On the
plain transformers path TRM calls ``generate`` with ``output_scores=True`` to capture the processed sampling
log-probs, which GRPO does not: the difference of the two ``generate`` medians is that cost (plus noise; the
table prints the mean completion lengths).

Usage::

    .venv/bin/python benchmarks/bench_trainer_overhead.py             # 50 measured steps per trainer (~2 min)
    .venv/bin/python benchmarks/bench_trainer_overhead.py --steps 20   # the minimum that means anything
    .venv/bin/python benchmarks/bench_trainer_overhead.py --first GRPO --output /tmp/x.json   # order check
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trl_trm.rollout  # noqa: E402
from trl_trm import TRMConfig, TRMTrainer  # noqa: E402
from trl_trm.demo import reversal_dataset, reversal_reward  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.03
TARGET_RATIO_EXACT = 1.10  # `trm_exact` with k = 20 (issue 13)
NAMES = ("TRM", "GRPO")


# ---------------------------------------------------------------------------------------------------- timers
class StepTimers:
    """Wall time of wrapped calls, accumulated per optimizer step of one trainer."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - start

        return timed

    def close_step(self, wall: float) -> None:
        self.steps.append(dict(self.current, wall=wall))
        self.current = defaultdict(float)


class TurnCallback(TrainerCallback):
    """Takes turns with the other trainer's process: at every `on_step_begin` it closes the previous step (if any),
    tells the parent "yield" and blocks until the parent says "go"; `on_train_end` closes the last step (the worker
    then sends "done" with its results). Everything the trainer does for a step (generation, loss, backward,
    optimizer step, logging, fetching the next batch) thus happens between a "go" and the next "yield" and is timed
    as `wall`."""

    def __init__(self, conn: Connection, timers: StepTimers) -> None:
        self.conn, self.timers = conn, timers
        self.start: float | None = None

    def _close_step(self) -> None:
        if self.start is not None:
            self.timers.close_step(time.perf_counter() - self.start)
            self.start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_step()
        self.conn.send("yield")
        message = self.conn.recv()
        if message != "go":
            raise RuntimeError(f"unexpected message from the parent: {message!r}")
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self._close_step()


# ---------------------------------------------------------------------------------------------------- set-up
DEFAULT_SPEC: dict[str, Any] = {
    "vocab": None,
    "hidden": 256,
    "layers": 4,
    "completion": 128,
    "batch": 8,
    "mode": "trm",
    "topk": 0,
    "device": "cpu",
    "dtype": None,
}
"""Model and step shape (``--vocab`` ... ``--topk``); ``vocab=None`` keeps the tokenizer's ~512 tokens."""

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2/2.5's vocabulary with a small backbone: the LM head dominates, the regime of issue 13's cost question.
    "qwen-vocab": {"vocab": 151936, "hidden": 64, "layers": 2, "completion": 64, "batch": 8},
    # benchmarks/gpu_check.sh: a ~109M-parameter model (12 layers, hidden 1024, V = 8192) in bf16 on one CUDA GPU.
    "gpu-100m": {
        "vocab": 8192,
        "hidden": 1024,
        "layers": 12,
        "completion": 128,
        "batch": 8,
        "device": "cuda",
        "dtype": "bfloat16",
    },
    # the same code path at toy size on CPU (the gpu_check.sh dry run)
    "gpu-dry-run": {"vocab": None, "hidden": 64, "layers": 2, "completion": 16, "batch": 8, "dtype": "bfloat16"},
}


def build_model_dir(path: str, spec: dict[str, Any] | None = None) -> str:
    from trl_trm.tiny import build_tiny_model, build_tiny_tokenizer

    spec = spec or DEFAULT_SPEC
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=spec["hidden"], num_layers=spec["layers"])
    if spec["vocab"] is not None:  # a wider LM head (tied embeddings); ids beyond the tokenizer decode to nothing
        model.resize_token_embeddings(spec["vocab"], mean_resizing=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def common_config(
    output_dir: str, max_steps: int, seed: int, allow_eos: bool = False, spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration both trainers share (``allow_eos`` no longer changes anything: see the module docstring)."""
    spec = spec or DEFAULT_SPEC
    return dict(
        output_dir=output_dir,
        use_cpu=spec["device"] == "cpu",
        bf16=True,
        model_init_kwargs={"dtype": spec["dtype"]} if spec["dtype"] else None,
        per_device_train_batch_size=spec["batch"],
        num_generations=4,
        max_completion_length=spec["completion"],
        learning_rate=1e-5,
        max_steps=max_steps,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        vllm_importance_sampling_correction=False,
        # `min_new_tokens` (fixed lengths) is refused by TRMTrainer since its sampler check (docs/samplers.md): it
        # changes the sampling distribution in a way TRM cannot reproduce on π_θ. Lengths now follow the model's EOS.
        generation_kwargs=None,
    )


def trm_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["mode"] == "trm_exact":  # permissive threshold: every sequence trains, as in `trm` at these mismatches
        return {"trm_mode": "trm_exact", "trm_rollout_topk": spec["topk"], "trm_delta_kl": 1.0}
    return {"trm_mode": "trm"}


def make_trainer(
    name: str,
    model_dir: str,
    out_dir: str,
    max_steps: int,
    seed: int,
    allow_eos: bool,
    spec: dict[str, Any] | None = None,
) -> Any:
    """TRMTrainer (``name="TRM"``, ``spec["mode"]``) or GRPOTrainer (``"GRPO"``) on the same model, data and
    config."""
    from trl import GRPOConfig, GRPOTrainer

    spec = spec or DEFAULT_SPEC
    config = common_config(out_dir, max_steps, seed, allow_eos, spec)
    if name == "TRM":
        trainer_cls, args = TRMTrainer, TRMConfig(**config, **trm_kwargs(spec))
    else:
        trainer_cls, args = GRPOTrainer, GRPOConfig(**config)
    return trainer_cls(
        model=model_dir, reward_funcs=reversal_reward, args=args, train_dataset=reversal_dataset(512, seed)
    )


def instrument(name: str, trainer: Any, timers: StepTimers) -> None:
    """Wrap the instance's methods (instance attributes shadow the class's, and `self.x(...)` finds them)."""
    trainer.model.generate = timers.wrap("generate", trainer.model.generate)
    trainer._generate_single_turn = timers.wrap("generate_single_turn", trainer._generate_single_turn)
    if name == "TRM":
        trainer._trm_apply = timers.wrap("trm_apply", trainer._trm_apply)
        trainer._trm_mask = timers.wrap("trm_mask", trainer._trm_mask)
        trainer._trm_log = timers.wrap("trm_log", trainer._trm_log)


# ---------------------------------------------------------------------------------------------------- run
def worker(
    name: str,
    conn: Connection,
    model_dir: str,
    out_dir: str,
    max_steps: int,
    seed: int,
    allow_eos: bool,
    spec: dict[str, Any] | None = None,
):
    """One trainer in its own process: train while taking turns, then send the per-step timings and logs."""
    warnings.filterwarnings("ignore")
    timers = StepTimers()
    try:
        if name == "TRM":  # the module-level function `record_sampling_logprobs` calls; only TRM calls it
            trl_trm.rollout._reduce_step = timers.wrap("sampled_token_logprobs", trl_trm.rollout._reduce_step)
        trainer = make_trainer(name, model_dir, out_dir, max_steps, seed, allow_eos, spec)
        instrument(name, trainer, timers)
        trainer.add_callback(TurnCallback(conn, timers))
        trainer.train()
        logs = [
            {k: v for k, v in h.items() if k in ("step_time", "completions/mean_length", "trm/accept_rate")}
            for h in trainer.state.log_history
            if "step_time" in h
        ]
        conn.send(("done", {"per_step": timers.steps, "logs": logs, "torch_threads": torch.get_num_threads()}))
    except BaseException as error:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(error).__name__}: {error}"))
        raise
    finally:
        conn.close()


def run(
    steps: int,
    warmup: int,
    seed: int,
    allow_eos: bool = False,
    first: str = "TRM",
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start both trainers in their own processes and let them take alternating steps (see the module docstring)."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked OpenMP state
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "model"), spec)
        conns: dict[str, Connection] = {}
        procs = []
        for name in NAMES:
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=worker,
                args=(name, child_conn, model_dir, os.path.join(tmp, name), steps + warmup, seed, allow_eos, spec),
                name=f"bench-{name}",
            )
            proc.start()
            child_conn.close()
            conns[name], procs = parent_conn, procs + [proc]
        raw: dict[str, dict] = {}
        start = time.perf_counter()
        try:
            for name in NAMES:  # both set up and waiting before the first step
                message = conns[name].recv()
                if message != "yield":
                    raise RuntimeError(f"{name} failed during set-up: {message}")
            start = time.perf_counter()
            order = [first, NAMES[1] if first == NAMES[0] else NAMES[0]]
            while len(raw) < len(NAMES):
                for name in order:
                    if name in raw:
                        continue
                    conns[name].send("go")
                    message = conns[name].recv()
                    if message == "yield":
                        continue
                    if message[0] == "error":
                        raise RuntimeError(f"{name} failed: {message[1]}")
                    raw[name] = message[1]
                    procs[NAMES.index(name)].join(timeout=120)  # its shutdown must not overlap the other's step
        finally:
            elapsed = time.perf_counter() - start
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.terminate()

    result: dict[str, Any] = {"elapsed_s": elapsed, "trainers": {}}
    for name in NAMES:
        steps_timed = raw[name]["per_step"][warmup:]
        step_logs = raw[name]["logs"][warmup:]
        per_key = defaultdict(list)
        for step in steps_timed:
            for key, value in step.items():
                per_key[key].append(value)
        n = len(steps_timed)
        summary = {key: statistics.median(values + [0.0] * (n - len(values))) for key, values in per_key.items()}
        summary["step_time"] = statistics.median(h["step_time"] for h in step_logs)
        summary["completion_length"] = statistics.mean(h["completions/mean_length"] for h in step_logs)
        result["trainers"][name] = {
            "median_s": summary,
            "steps_measured": n,
            "torch_threads": raw[name]["torch_threads"],
            "per_step": steps_timed,
            "step_time_per_step": [h["step_time"] for h in step_logs],
            "completion_length_per_step": [h["completions/mean_length"] for h in step_logs],
            "trm_accept_rate_per_step": [h.get("trm/accept_rate") for h in step_logs] if name == "TRM" else None,
        }
    trm, grpo = (result["trainers"][n]["median_s"] for n in NAMES)
    result["ratio_wall"] = trm["wall"] / grpo["wall"]
    result["ratio_step_time"] = trm["step_time"] / grpo["step_time"]
    # paired ratios: TRM's step i against GRPO's step i, which ran right before or after it
    pairs = zip(result["trainers"]["TRM"]["per_step"], result["trainers"]["GRPO"]["per_step"], strict=False)
    paired = [a["wall"] / b["wall"] for a, b in pairs]
    result["ratio_wall_paired_median"] = statistics.median(paired)
    result["ratio_wall_paired_quartiles"] = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return result


# ---------------------------------------------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
    import transformers
    import trl

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
    }


def report_table(result: dict[str, Any]) -> str:
    trm = result["trainers"]["TRM"]["median_s"]
    grpo = result["trainers"]["GRPO"]["median_s"]
    rows = [
        ("step wall time (its whole turn)", "wall"),
        ("TRL step_time (training_step)", "step_time"),
        ("  model.generate", "generate"),
        ("  _generate_single_turn (generate + TRM capture)", "generate_single_turn"),
        ("  TRM: sampled_token_logprobs (scores -> log-probs)", "sampled_token_logprobs"),
        ("  TRM: _trm_apply (mask + metrics + scaling)", "trm_apply"),
        ("  TRM:   _trm_mask (compute_trust_region_mask)", "trm_mask"),
        ("  TRM:   _trm_log (gather + summarize_mask_stats)", "trm_log"),
    ]
    out = "| median per step | TRM ms | GRPO ms | TRM / GRPO |\n|---|---:|---:|---:|\n"
    for label, key in rows:
        a, b = trm.get(key), grpo.get(key)
        a_s = "-" if a is None else f"{a * 1e3:.1f}"
        b_s = "-" if b is None else f"{b * 1e3:.1f}"
        ratio = f"{a / b:.3f}" if a is not None and b else ""
        out += f"| {label} | {a_s} | {b_s} | {ratio} |\n"
    out += (
        f"| mean completion length (tokens) | {trm['completion_length']:.1f} | {grpo['completion_length']:.1f} | |\n"
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="measured optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="discarded first steps per trainer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-eos", action="store_true", help="let completions stop at EOS (random lengths)")
    parser.add_argument("--first", choices=NAMES, default="TRM", help="which trainer takes the first step")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="qwen-vocab: V=151,936, hidden 64, 2 layers, T=64; gpu-100m: ~109M parameters in bf16 on CUDA",
    )
    parser.add_argument("--vocab", type=int, default=None, help="LM-head vocabulary (default: the tokenizer's)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--completion", type=int, default=None, help="completion tokens (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default 8)")
    parser.add_argument("--mode", choices=["trm", "trm_exact"], default="trm")
    parser.add_argument("--topk", type=int, default=20, help="trm_rollout_topk for --mode trm_exact")
    parser.add_argument("--output", type=Path, default=None, help="default: results/bench_trainer_overhead[_...].json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    spec = {**DEFAULT_SPEC, **PRESETS.get(args.preset, {})}
    for key in ("vocab", "hidden", "layers", "completion", "batch"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    spec["mode"], spec["topk"] = args.mode, (args.topk if args.mode == "trm_exact" else 0)
    if args.output is None:
        suffix = ("_" + args.preset if args.preset else "") + ("_trm_exact" if args.mode == "trm_exact" else "")
        args.output = RESULTS / f"bench_trainer_overhead{suffix}.json"

    load_before = os.getloadavg()
    result = run(args.steps, args.warmup, args.seed, args.allow_eos, args.first, spec)
    load_after = os.getloadavg()
    info = machine_info()
    trm = result["trainers"]["TRM"]["median_s"]
    overhead_ms = (trm.get("trm_apply", 0.0) + trm.get("sampled_token_logprobs", 0.0)) * 1e3
    target = TARGET_RATIO_EXACT if spec["mode"] == "trm_exact" else TARGET_RATIO
    met = result["ratio_wall"] <= target
    q = result["ratio_wall_paired_quartiles"]

    print(
        f"\n## TRMTrainer vs GRPOTrainer, CPU ({info['cpu_model']}, {info['torch_threads']} threads, torch "
        f"{info['torch_version']}, trl {info['trl_version']})"
    )
    print(
        f"{args.steps} measured steps per trainer after {args.warmup} warm-up, interleaved; "
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; {result['elapsed_s']:.0f} s\n"
    )
    print(report_table(result))
    print(
        f"ratio TRM/GRPO (median step wall time): {result['ratio_wall']:.3f}; median of paired per-step ratios: "
        f"{result['ratio_wall_paired_median']:.3f} (quartiles {q[0]:.3f} / {q[2]:.3f}); "
        f"TRL step_time ratio: {result['ratio_step_time']:.3f}"
    )
    print(
        f"TRM-specific work per step (median _trm_apply + sampled_token_logprobs): {overhead_ms:.1f} ms "
        f"= {overhead_ms / (trm['wall'] * 1e3) * 100:.2f}% of the TRM step"
    )
    print(f"target TRM/GRPO <= {target}: {'met' if met else 'NOT met'}")

    report = {
        "benchmark": "trainer_overhead",
        "machine": info,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "config": {
            "model": f"trl_trm.tiny Qwen2, hidden_size={spec['hidden']}, num_layers={spec['layers']}, "
            f"vocab {spec['vocab'] or '~512 (tokenizer)'}",
            **common_config("<tmp>", args.steps + args.warmup, args.seed, args.allow_eos, spec),
            "first": args.first,
            "preset": args.preset,
            "spec": spec,
            **trm_kwargs(spec),
        },
        "method": "interleaved steps: two train() processes take turns at on_step_begin; medians after warm-up",
        "steps": args.steps,
        "warmup": args.warmup,
        "target_ratio": target,
        "target_met": met,
        "trm_overhead_ms_median": overhead_ms,
        **result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
