"""`TRMTrainer`'s start-up checks: settings under which TRM would be silently wrong, each refused with one error naming
the fix. No TRL import (TRL's config class is imported only to name it in an error).

The checks of a rollout engine live beside it: :func:`trl_trm.topk.check_topk_setup` (`trm_rollout_topk`) and
:func:`trl_trm.vllm_checks.check_vllm_logprobs` (vLLM's log-prob settings).
"""

from __future__ import annotations

from typing import Any


def trm_config_for(model: Any, args: Any):
    """``args``, or a default `TRMConfig` named after the model (as `GRPOTrainer` does); any other config class is
    refused (a `GRPOConfig` lacks the trm_* fields)."""
    from .config import TRMConfig

    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return TRMConfig(f"{model_name.split('/')[-1]}-TRM")
    if not isinstance(args, TRMConfig):
        from trl import GRPOConfig

        kind = "GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
        raise TypeError(
            f"TRMTrainer needs a `TRMConfig`, got a {kind}. Build it with `TRMConfig(**your_kwargs)`; it accepts "
            "every GRPOConfig field plus the trm_* fields."
        )
    return args


def check_trainer_setup(trainer: Any) -> None:
    """Refuse a `TRMTrainer` set-up TRM cannot serve (read from the built ``trainer``, duck-typed):

    * transformers continuous batching generating the rollouts (no `rollout_func`): it reports no log-probs;
    * `fsdp` set while Accelerate runs something else: accelerate 1.15 switches to FSDP only for accelerator process
      groups, so `fsdp` with `use_cpu=True` would train with plain DDP (docs/distributed.md).
    """
    args, distributed_type = trainer.args, trainer.accelerator.distributed_type
    trm_mode, fsdp = args.trm_mode, args.fsdp
    continuous_batching = trainer.use_transformers_continuous_batching and trainer.rollout_func is None
    if continuous_batching and trm_mode != "none":
        raise ValueError(
            f"`trm_mode={trm_mode!r}` needs the rollout log-probs, but transformers continuous batching "
            "(`use_transformers_continuous_batching=True`) does not report them. Use vLLM (`use_vllm=True`), "
            "plain transformers generation (`use_transformers_continuous_batching=False`), or a `rollout_func` "
            "that returns `logprobs`."
        )
    if fsdp and distributed_type != "FSDP":  # accelerate's `DistributedType` is a `str` enum
        raise ValueError(
            f"`fsdp={fsdp!r}` has no effect here: Accelerate runs this job as {distributed_type!s} (accelerate "
            "enables FSDP only on accelerator processes, not with `use_cpu=True`), so the model would not be "
            "sharded. Remove `fsdp` / `fsdp_config`, or run on GPUs (see docs/distributed.md)."
        )


def check_old_policy(trainer: Any) -> None:
    """`trm_old_policy="rollout"` with sampler processors is refused: the processed rollout log-probs would be the
    denominator of TRL's unprocessed ratio, which would then differ from 1 on-policy."""
    if trainer.args.trm_old_policy == "rollout" and trainer._trm_processors is not None:
        raise ValueError(
            "`trm_old_policy='rollout'` puts the processed rollout log-probs (top-k/top-p/min-p/repetition penalty) "
            "in the denominator of TRL's unprocessed ratio, which would then differ from 1 on-policy. Sample "
            "without those processors, or use `trm_old_policy='trainer'`."
        )


def setup_rollout_topk(trainer: Any) -> None:
    """Checks and vLLM set-up for `trm_rollout_topk = k > 0`."""
    from . import topk

    engine_func, k = trainer.rollout_func is not None, trainer.args.trm_rollout_topk
    topk.check_topk_setup(k, trainer.use_transformers_continuous_batching, engine_func, bool(trainer.tools))
    if trainer.use_vllm and not engine_func:
        # TRL's VLLMGeneration asks for `logprobs=0` (the sampled token's), read at every call: now also the top-k.
        trainer.vllm_generation.logprobs = k  # the engine's `max_logprobs` is then checked against it
