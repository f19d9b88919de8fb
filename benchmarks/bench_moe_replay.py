"""MoE routing mismatch and rollout routing replay (`trm_routing_replay`) on a tiny Qwen3-MoE, CPU.

Set-up: the demo's (`recipes/demo.yaml`): the string-reversal task, plain transformers generation in fp32 (the
rollout log-probs and routes are captured), training under bf16 autocast, `trm_mode="trm"` with the demo's tight
`trm_delta_max=0.002`, `trm_rollout_topk = V` (exact per-token KLs). The model is a tiny Qwen3-MoE built locally
(``--hidden``, ``--layers``, ``--experts``, top-``--topk`` routing; router weights drawn N(0, 0.5²) so that routing is
not tied) with the tiny tokenizer of `trl_trm.tiny`. Runs from the same seed, without and with replay, in ``--rounds`` interleaved rounds (A B, B A, ...). The two runs
sample the same first batch; after the first update their policies, and so their samples, differ.

Per loss forward it records (through the `_trm_evaluate` seam of a subclass; the mask itself is not changed):

* the completion tokens whose routing disagrees (the expert set at the position that predicts the token differs from
  the rollout's in at least one layer: `trl_trm.routing.disagreement`; with replay, the routes the training forward
  *would* have chosen);
* |log ρ_t| of those tokens and of the others: the share of D_max (per sequence: is its arg-max token a disagreeing
  one?) and of the `delta_max` rejections (a rejected sequence whose tokens above δ include a disagreeing one, or
  only others);
* the logged `trm/routing_disagree_frac`, `trm/accept_rate`, `trm/log_ratio_abs_max/mean`, `trm/kl_tok_mean/mean`;
* the wall time of each optimizer step (`on_step_begin` → `on_step_end`) and the bytes of the batch's `trm_routes`.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_moe_replay.py --steps 12 --out benchmarks/results/bench_moe_replay.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _build_model(path: str, args) -> None:
    from trl_trm.tiny import save_tiny_moe_model

    save_tiny_moe_model(
        path,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        head_dim=32,
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=True,
        tie_word_embeddings=True,
    )


def _trainer_class():
    import torch

    from trl_trm import TRMTrainer, routing

    class Instrumented(TRMTrainer):
        """Records, per loss forward, |log rho| split by routing disagreement (the mask is not changed)."""

        records: list[dict]

        def _trm_evaluate(self, mask_logps, old_logps, inputs, theta_topk=None):
            result, weights = super()._trm_evaluate(mask_logps, old_logps, inputs, theta_topk)
            own = self._trm_routing.forcer.own_routes()
            if not torch.is_grad_enabled() or own is None or routing.ROUTES_KEY not in inputs:
                return result, weights
            mask = inputs["completion_mask"].bool()
            counted = routing.counted_tokens(inputs[routing.ROUTES_KEY], mask)  # (B, C)
            flip, _ = routing.disagreement(inputs[routing.ROUTES_KEY], own.to(mask.device), counted)  # (B, C)
            log_rho = (mask_logps - inputs["sampling_per_token_logps"]).detach().float().abs()  # (B, C)
            log_rho = torch.where(mask, log_rho, torch.zeros_like(log_rho))
            over = log_rho > self.args.trm_delta_max  # (B, C) tokens above delta_max
            rejected = result.rejected_by.get("delta_max", torch.zeros_like(result.keep))
            argmax = log_rho.argmax(dim=1, keepdim=True)  # (B, 1)
            self.records.append(
                {
                    "tokens": int(counted.sum()),
                    "disagree": int(flip.sum()),
                    "abs_log_rho_disagree": log_rho[flip].tolist(),
                    "abs_log_rho_other": log_rho[counted & ~flip].tolist(),
                    "dmax_from_disagree": int(flip.gather(1, argmax).squeeze(1)[mask.any(1)].sum()),
                    "sequences": int(mask.any(1).sum()),
                    "rejected": int(rejected.sum()),
                    "rejected_with_disagree_over": int((rejected & (over & flip).any(1)).sum()),
                    "rejected_only_other_over": int((rejected & ~(over & flip).any(1)).sum()),
                    "routes_bytes": inputs[routing.ROUTES_KEY].numel() * inputs[routing.ROUTES_KEY].element_size(),
                }
            )
            return result, weights

    return Instrumented


def _run(model_dir: str, replay: bool, args) -> dict:
    from transformers import TrainerCallback

    from trl_trm import TRMConfig
    from trl_trm.tasks import reversal, reversal_dataset

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    cls = _trainer_class()
    cls.records = []
    with tempfile.TemporaryDirectory() as out:
        config = TRMConfig(
            output_dir=out,
            use_cpu=True,
            bf16=True,
            seed=0,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            num_generations=8,
            max_completion_length=args.length,
            temperature=1.0,
            learning_rate=0.01,
            beta=0.0,
            loss_type="dapo",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            gradient_checkpointing=False,
            trm_mode="trm",
            trm_delta_max=0.002,
            trm_delta_avg=0.01,
            trm_rollout_topk=512,
            trm_plot=False,
            trm_routing_replay=replay,
        )
        trainer = cls(
            model=model_dir,
            reward_funcs=reversal,
            args=config,
            train_dataset=reversal_dataset(256, seed=0),
            callbacks=[Timer()],
        )
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "trm/accept_rate" in log]
    return {"records": cls.records, "logs": logs, "step_times": step_times}


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _summary(runs: list[dict], warmup: int) -> dict:
    recs = [r for run in runs for r in run["records"]]
    logs = [log for run in runs for log in run["logs"]]
    dis = [x for r in recs for x in r["abs_log_rho_disagree"]]
    oth = [x for r in recs for x in r["abs_log_rho_other"]]
    rejected = sum(r["rejected"] for r in recs)
    times = [t for run in runs for t in run["step_times"][warmup:]]
    keys = ("trm/routing_disagree_frac", "trm/accept_rate", "trm/log_ratio_abs_max/mean", "trm/kl_tok_mean/mean")
    return {
        **{k: _mean([log[k] for log in logs if k in log]) for k in keys},
        "tokens": sum(r["tokens"] for r in recs),
        "tokens_disagree": sum(r["disagree"] for r in recs),
        "mean_abs_log_rho_disagree": _mean(dis),
        "mean_abs_log_rho_other": _mean(oth),
        "max_abs_log_rho_disagree": max(dis, default=float("nan")),
        "max_abs_log_rho_other": max(oth, default=float("nan")),
        "sequences": sum(r["sequences"] for r in recs),
        "dmax_token_disagrees": sum(r["dmax_from_disagree"] for r in recs),
        "rejected_delta_max": rejected,
        "rejected_with_disagreeing_token_over_delta": sum(r["rejected_with_disagree_over"] for r in recs),
        "rejected_only_other_tokens_over_delta": sum(r["rejected_only_other_over"] for r in recs),
        "routes_bytes_per_micro_batch": _mean([r["routes_bytes"] for r in recs]),
        "step_time_median_s": statistics.median(times) if times else float("nan"),
        "step_times_s": [round(t, 4) for t in times],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (order alternates)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    result["load_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as model_dir:
        _build_model(model_dir, args)
        runs: dict[str, list[dict]] = {"no_replay": [], "replay": []}
        for r in range(args.rounds):  # A B, B A, ...: a change of load hits both alike
            order = [("no_replay", False), ("replay", True)]
            for name, replay in order if r % 2 == 0 else order[::-1]:
                print(f"[round {r} {name}] load {os.getloadavg()}", file=sys.stderr)
                runs[name].append(_run(model_dir, replay, args))
        for name, kept in runs.items():
            result[name] = _summary(kept, args.warmup)
    result["load_after"] = os.getloadavg()
    for name in ("no_replay", "replay"):
        row = {k: v for k, v in result[name].items() if k != "step_times_s"}
        print(name, json.dumps(row, indent=1))
    print("load average before/after:", result["load_before"], result["load_after"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
