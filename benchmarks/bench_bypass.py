"""Step time saved by `trm_old_policy="rollout"` (π_old := π_roll, TRL's old-log-prob forward skipped), CPU.

Both runs: `TRMTrainer` on a tiny Qwen2 built locally (`trl_trm.tiny`; ``--hidden``/``--layers`` size it), plain
transformers generation (the rollout log-probs are captured), ``trm_mode="trm"``, ``num_iterations=2`` (so TRL
computes ``old_per_token_logps`` with one no-grad forward per generated batch, and bypass skips it),
``per_device_train_batch_size=8, num_generations=4``, fp32, the same seed. The learning rate is TRL's default 1e-6,
so both runs sample the same completions (same RNG draws, policies that differ by ~1e-6): the only difference is
the skipped forward. The table prints both runs' mean completion lengths to show it.

Method: interleaved rounds in one process. Each round trains a fresh trainer of each kind for ``--steps`` steps,
the order alternating between rounds (A B, B A, ...), so a change of load hits both alike. Per step it records the
wall time from ``on_step_begin`` to ``on_step_end`` (generation on every second step, loss, backward, optimizer);
for the default run also the time of the no-grad `_get_per_token_logps_and_entropies` calls in the
generation (the old-log-prob forward, what bypass saves). The first ``--warmup`` steps of each run are dropped.
The load average (``os.getloadavg()``) is printed before every round and at the end.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_bypass.py                       # 5 rounds x 8 steps, hidden 64
    OMP_NUM_THREADS=1 python benchmarks/bench_bypass.py --hidden 256 --layers 4 --length 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _run(model_dir: str, dataset, policy: str, opts, out_dir: str) -> dict:
    import torch
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    from trl_trm import TRMConfig, TRMTrainer

    args = TRMConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=opts.length,
        num_iterations=2,
        learning_rate=1e-6,
        max_steps=opts.steps,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        temperature=1.0,
        trm_mode="trm",
        trm_old_policy=policy,
        trm_plot=False,
        trm_accept_rate_floor=None,
        disable_tqdm=True,
    )
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            step_times.append(time.perf_counter() - self.start)

    trainer = TRMTrainer(
        model=model_dir, reward_funcs=lambda completions, **kw: [len(c) / 40 for c in completions], args=args,
        train_dataset=dataset, callbacks=[Timer()],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    old_forward: list[float] = []
    inner = trainer._get_per_token_logps_and_entropies

    def timed(*a, **kw):  # the no-grad calls in the generation step: TRL's old-log-prob forward (no ref: beta=0)
        start, skipped = time.perf_counter(), trainer.trm_skipped_old_forwards
        out = inner(*a, **kw)
        if not torch.is_grad_enabled() and trainer.trm_skipped_old_forwards == skipped:  # a forward that ran
            old_forward.append(time.perf_counter() - start)
        return out

    trainer._get_per_token_logps_and_entropies = timed
    trainer.train()
    kept = step_times[opts.warmup :]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "mean": statistics.fmean(kept),
        "median": statistics.median(kept),
        "old_forward": sum(old_forward) / max(1, len(old_forward)),
        "old_forwards": len(old_forward),
        "skipped": trainer.trm_skipped_old_forwards,
        "length": statistics.fmean(lengths) if lengths else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps per run (num_iterations=2: steps/2 generations)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=64, help="max_completion_length")
    opts = parser.parse_args(argv)
    if opts.steps <= opts.warmup or opts.steps % 2:
        parser.error("--steps must be even and larger than --warmup")
    import torch
    from datasets import Dataset

    from trl_trm.tiny import save_tiny_model

    warnings.filterwarnings("ignore")
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, python {sys.version.split()[0]}")
    print(
        f"tiny Qwen2 hidden={opts.hidden} layers={opts.layers}, batch 8, max_completion_length={opts.length}, "
        f"num_iterations=2, {opts.steps} steps per run ({opts.warmup} dropped), {opts.rounds} rounds"
    )
    dataset = Dataset.from_list([{"prompt": f"{i}+{i % 7}="} for i in range(64)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(os.path.join(tmp, "model"), hidden_size=opts.hidden, num_layers=opts.layers)
        for r in range(opts.rounds):
            load = _load()
            order = ("trainer", "rollout") if r % 2 == 0 else ("rollout", "trainer")
            res = {p: _run(model_dir, dataset, p, opts, os.path.join(tmp, f"{p}{r}")) for p in order}
            d, b = res["trainer"], res["rollout"]
            rows.append((d, b))
            print(
                f"round {r} (first {order[0]:>7}, load {load}): default {d['mean'] * 1e3:7.1f} ms/step "
                f"(old forward {d['old_forward'] * 1e3:5.1f} ms x {d['old_forwards']}), bypass {b['mean'] * 1e3:7.1f} "
                f"ms/step (old forwards run {b['old_forwards']}, skipped {b['skipped']}); bypass/default "
                f"{b['mean'] / d['mean']:.3f}; mean length {d['length']:.1f} / {b['length']:.1f}"
            )
    ratios = [b["mean"] / d["mean"] for d, b in rows]
    saved = [d["mean"] - b["mean"] for d, b in rows]
    forward = [d["old_forward"] for d, _ in rows]
    print(
        f"median over rounds: bypass/default {statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
        f"{max(ratios):.3f}); saved {statistics.median(saved) * 1e3:.1f} ms/step; old forward "
        f"{statistics.median(forward) * 1e3:.1f} ms per generated batch (= {statistics.median(forward) * 1e3 / 2:.1f} "
        f"ms/step at num_iterations=2); load at end {_load()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
