"""Peak memory of one `TRMTrainer` training step with `trm_exact` (k = 20 rollout top-k) against `trm` (k = 0), CPU.

What a step is here: ``TRMTrainer._compute_loss`` on a prepared batch (TRL's fused-head forward, the TRM mask, and
with `trm_exact` the top-k capture of :class:`trl_trm.topk.FusedHeadCapture`), ``backward()`` and an SGD step. The
batch is built directly (no generation), so the numbers are those of the loss side, where `trm_exact` adds work;
the rollout side only adds the (B, T, k) top-k tensors to the batch (their size is printed).

Model: a random 2-layer, hidden-64 Qwen2 (`trl_trm.tiny.build_tiny_model`) with its vocabulary widened to V, so
that the LM head (the part that scales with V) dominates. Training in float32 (``bf16=False``). Default shape:
B = 8 completions of T = 512 tokens after P = 16 prompt tokens, V = 32768, k = 20. Rollout top-k: k distinct ids and
plausible log-probs per position (values do not change the memory).

Each configuration runs in its own fresh process (``--worker``) and is measured after 2 warm-up steps:

* ``peak``: the peak of live torch CPU bytes allocated during the step, from ``torch.profiler`` memory events
  (``bench_masking.profiled_peak_bytes``: every allocation and free replayed in order; calibrated at start-up);
* ``rss``: the growth of the process's peak resident set during the step (``VmHWM`` reset through
  ``/proc/self/clear_refs``), a cross-check (a lower bound: glibc reuses freed heap pages);
* ``time``: median wall time of 3 steps (noisy on a shared machine: see the load averages in the JSON).

Then ``trm`` and ``trm_exact`` are built in one more process and run in turns (``--timing-steps`` each, after one
warm-up step), so that a change of machine load hits both alike: the median step times and their ratio.

Since issue 22 the ``trm_exact`` step runs the one-pass head (`trl_trm.head_pass`, ``ONE_PASS_CHUNK_ELEMENTS``
logits per block); "capture alone" still measures the former second projection (``head_logprobs_at``), and the
results in `results/` predate the change. ``benchmarks/bench_head_pass.py`` compares both against GRPOTrainer.

Configurations: ``trm`` (k = 0); ``trm_exact`` (k = 20, default ``HEAD_CHUNK_ELEMENTS`` = 2**24 logits per block);
``trm_exact_small_chunks`` (k = 20, 2**20); and ``dense_reference``: ``trm`` plus a (B, L, V) float32 log-softmax of
the full logits, computed under ``no_grad`` before the loss and held until the step ends, i.e. what materialised
logits (a non-fused head, or π_θ at the top-k ids read from full logits) would add. In the ``trm_exact`` rows the
top-k capture's own computation is also measured alone (``head_logprobs_at`` at the step's shapes): its peak and time.

Usage::

    .venv/bin/python benchmarks/bench_trm_exact_memory.py                  # default shape, ~10 min here
    .venv/bin/python benchmarks/bench_trm_exact_memory.py --length 128 --vocab 8192 --output /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_masking import (  # noqa: E402
    calibrate_memory_method,
    machine_info,
    profiled_peak_bytes,
    rss_peak_extra_bytes,
)

RESULTS = HERE / "results"
CONFIGS = {
    "trm": {"trm_mode": "trm", "topk": 0},
    "trm_exact": {"trm_mode": "trm_exact", "topk": 20},
    "trm_exact_small_chunks": {"trm_mode": "trm_exact", "topk": 20, "head_chunk_elements": 1 << 20},
    "dense_reference": {"trm_mode": "trm", "topk": 0, "dense": True},
}
MIB = 1 << 20


def build_batch(batch: int, prompt: int, length: int, vocab: int, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (batch, prompt), generator=g)
    completion_ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    out = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "advantages": torch.randn(batch, generator=g),
        "num_items_in_batch": mask.sum(),
        "sampling_per_token_logps": -torch.rand(batch, length, generator=g) - 9.0,
    }
    if k > 0:
        base = torch.randint(0, vocab, (batch, length, 1), generator=g)
        ids = (base + 7919 * torch.arange(k)) % vocab  # (B, T, k), distinct: 7919 is odd and V a power of 2
        logprobs = -torch.rand(batch, length, k, generator=g).sort(dim=-1).values - 8.0  # descending, sum p < 1
        out.update(trm_topk_logprobs=logprobs, trm_topk_ids=ids, trm_topk_mask=torch.ones_like(ids, dtype=torch.bool))
    return out


def setup(spec: dict):
    """(trainer, step function) for one configuration: a fresh model, batch and SGD optimizer."""
    import tempfile

    from datasets import Dataset

    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.tiny import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    model.resize_token_embeddings(spec["vocab"])
    args = TRMConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=spec["batch"],
        num_generations=spec["batch"],
        max_completion_length=spec["length"],
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        trm_mode=spec["trm_mode"],
        trm_rollout_topk=spec["topk"],
        trm_delta_avg=None,
        trm_delta_kl=1e9,
        trm_delta_max=10.0,
    )
    trainer = TRMTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    batch = build_batch(spec["batch"], spec["prompt"], spec["length"], spec["vocab"], spec["topk"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> tuple[float, float]:
        """One step; returns the CPU seconds of (the loss forward, backward + optimizer step)."""
        start = time.process_time()
        dense = None
        if spec.get("dense"):  # (B, L, V) float32 log-probs held through the step, as materialised logits would be
            with torch.no_grad():
                ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
                dense = torch.log_softmax(model(ids).logits.float(), -1)
        loss = trainer._compute_loss(model, batch)
        middle = time.process_time()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del dense
        return middle - start, time.process_time() - middle

    return trainer, batch, step


def worker(spec: dict) -> dict:
    import trl_trm.lm_head as topk_module

    calibrate_memory_method()
    if "head_chunk_elements" in spec:  # read at call time: the one-pass head's blocks, and the reference's
        import trl_trm.head_pass as head_pass

        head_pass.ONE_PASS_CHUNK_ELEMENTS = spec["head_chunk_elements"]
        topk_module.HEAD_CHUNK_ELEMENTS = spec["head_chunk_elements"]
    trainer, batch, step = setup(spec)
    model = trainer.model
    optimizer_zero = trainer.model.zero_grad
    for _ in range(2):
        step()
    peak, retained = profiled_peak_bytes(step)
    rss = rss_peak_extra_bytes(step)
    forward_peak, _ = profiled_peak_bytes(lambda: trainer._compute_loss(model, batch))  # the loss forward alone
    optimizer_zero(set_to_none=True)
    capture_peak = None
    if spec["topk"]:  # the top-k capture's own computation, alone, at the step's shapes
        n = spec["batch"] * spec["length"]
        hidden = torch.randn(n, model.config.hidden_size)
        ids = torch.randint(0, spec["vocab"], (n, spec["topk"] + 1))
        weight = model.get_output_embeddings().weight
        capture_peak, _ = profiled_peak_bytes(lambda: topk_module.head_logprobs_at(hidden, weight, None, ids))
        capture_times = []
        for _ in range(3):
            start = time.perf_counter()
            topk_module.head_logprobs_at(hidden, weight, None, ids)
            capture_times.append(time.perf_counter() - start)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("trm/kl_tok")}
    return {
        "peak_bytes": peak,
        "retained_bytes": retained,
        "forward_peak_bytes": forward_peak,
        "capture_alone_peak_bytes": capture_peak,
        "capture_alone_times_s": capture_times if spec["topk"] else None,
        "rss_peak_extra_bytes": rss,
        "times_s": times,
        **metrics,
    }


def timing_worker(specs: list[dict], steps: int) -> dict:
    """Step times of each configuration, built in one process and run in turns (A, B, A, B, ...), so that a change of
    machine load hits all alike: wall seconds per step, and the process's CPU seconds of the loss forward and of
    backward + optimizer step (CPU time does not count time spent waiting for a core other jobs hold)."""
    runs = [setup(spec)[2] for spec in specs]
    for step in runs:  # warm-up
        step()
    times: list[list[float]] = [[] for _ in specs]
    forward: list[list[float]] = [[] for _ in specs]
    backward: list[list[float]] = [[] for _ in specs]
    for _ in range(steps):
        for i, step in enumerate(runs):
            start = time.perf_counter()
            fwd, bwd = step()
            times[i].append(time.perf_counter() - start)
            forward[i].append(fwd)
            backward[i].append(bwd)
    return {"times_s": times, "forward_cpu_s": forward, "backward_cpu_s": backward}


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_trm_exact_memory.json")
    parser.add_argument(
        "--timing-steps", type=int, default=5, help="interleaved trm / trm_exact steps for the time ratio (0: skip)"
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        result = timing_worker(spec["timing"], spec["steps"]) if "timing" in spec else worker(spec)
        print(json.dumps(result))
        return {}

    shape = {"batch": args.batch, "prompt": args.prompt, "length": args.length, "vocab": args.vocab}
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for name in args.configs:
        spec = {"name": name, **shape, **CONFIGS[name]}
        if spec["topk"]:
            spec["topk"] = args.topk
        result = run_worker(spec)
        rows.append({"config": name, **spec, **result})
        print(f"{name}: peak {result['peak_bytes'] / MIB:.1f} MiB", file=sys.stderr)

    B, T, V, P = args.batch, args.length, args.vocab, args.prompt
    sizes = {
        "logits_BLV_float32_mib": B * (P + T) * V * 4 / MIB,
        "logits_BTV_float32_mib": B * T * V * 4 / MIB,
        "topk_batch_tensors_mib": B * T * args.topk * (4 + 8 + 1) / MIB,
        "head_block_float32_mib": min(B * T, (1 << 24) // V) * V * 4 / MIB,
    }
    base = next((r for r in rows if r["config"] == "trm"), None)
    print(f"\n(B, T, V, k) = ({B}, {T}, {V}, {args.topk}), P = {P}; float32 training, CPU\n")
    print(
        "| config | step peak MiB | vs trm | loss-forward peak MiB | vs trm | RSS growth MiB "
        "| capture alone: peak MiB | capture alone: s | step s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = f"{(r['peak_bytes'] - base['peak_bytes']) / MIB:+.1f}" if base else "-"
        fwd_extra = f"{(r['forward_peak_bytes'] - base['forward_peak_bytes']) / MIB:+.1f}" if base else "-"
        rss = "-" if r["rss_peak_extra_bytes"] is None else f"{r['rss_peak_extra_bytes'] / MIB:.1f}"
        cap = "-" if r["capture_alone_peak_bytes"] is None else f"{r['capture_alone_peak_bytes'] / MIB:.1f}"
        cap_s = "-" if not r["capture_alone_times_s"] else f"{statistics.median(r['capture_alone_times_s']):.2f}"
        print(
            f"| {r['config']} | {r['peak_bytes'] / MIB:.1f} | {extra} | {r['forward_peak_bytes'] / MIB:.1f} "
            f"| {fwd_extra} | {rss} | {cap} | {cap_s} | {statistics.median(r['times_s']):.2f} |"
        )
    timing = None
    if args.timing_steps > 0:
        specs = [
            {"name": n, **shape, **CONFIGS[n], **({"topk": args.topk} if CONFIGS[n]["topk"] else {})}
            for n in ("trm", "trm_exact")
        ]
        timing = run_worker({"name": "timing", "timing": specs, "steps": args.timing_steps})
        medians = [statistics.median(t) for t in timing["times_s"]]
        fwd = [statistics.median(t) for t in timing["forward_cpu_s"]]
        bwd = [statistics.median(t) for t in timing["backward_cpu_s"]]
        timing["median_s"] = dict(zip(("trm", "trm_exact"), medians, strict=True))
        timing["ratio_trm_exact_over_trm"] = medians[1] / medians[0]
        timing["median_forward_cpu_s"] = dict(zip(("trm", "trm_exact"), fwd, strict=True))
        timing["median_backward_cpu_s"] = dict(zip(("trm", "trm_exact"), bwd, strict=True))
        print(
            f"\nInterleaved in one process ({args.timing_steps} steps each), medians: wall step trm {medians[0]:.2f} s, "
            f"trm_exact {medians[1]:.2f} s (ratio {medians[1] / medians[0]:.3f}); CPU s loss forward {fwd[0]:.2f} / "
            f"{fwd[1]:.2f}, backward + optimizer {bwd[0]:.2f} / {bwd[1]:.2f}"
        )
    print(
        f"\nReference sizes: (B, P+T, V) float32 logits {sizes['logits_BLV_float32_mib']:.0f} MiB; (B, T, V) "
        f"{sizes['logits_BTV_float32_mib']:.0f} MiB; the batch's top-k tensors {sizes['topk_batch_tensors_mib']:.2f} "
        f"MiB; one head block of trm_exact {sizes['head_block_float32_mib']:.0f} MiB."
    )
    out = {
        "benchmark": "bench_trm_exact_memory",
        "shape": {**shape, "topk": args.topk, "hidden": 64, "layers": 2, "dtype": "float32"},
        "machine": machine_info(),
        "memory_method": "torch.profiler profile_memory=True, replay of [memory] events (bytes); RSS VmHWM cross-check",
        "reference_sizes_mib": sizes,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "interleaved_timing": timing,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.output}")
    return out


if __name__ == "__main__":
    main()
