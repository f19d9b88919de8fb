"""What a vLLM engine's configuration must say for TRM's rollout log-probs to be right (no vLLM or TRL import).

:func:`check_vllm_logprobs` is run at start-up by `check_trainer_engine` (from `TRMTrainer.__init__`): it reads a server's
`/server_info` `model_config` (JSON) or a colocated engine's `ModelConfig` attributes and judges them with
:func:`vllm_engine_problems`. See docs/vllm.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

PROCESSED = "processed_logprobs"


def vllm_engine_problems(model_config: dict[str, Any], requested: int, server: bool) -> list[str]:
    """Problems (empty list: none) with an engine whose `model_config` has `logprobs_mode` and `max_logprobs`, for a
    trainer that requests `requested` top log-probs per token (0 = the sampled token's only).

    `logprobs_mode` must be `processed_logprobs` (what TRM compares with the training policy is the distribution that
    was sampled from, after temperature and top-k/top-p); `max_logprobs` must be -1 (unlimited) or >= `requested`.
    """
    problems = []
    mode = model_config.get("logprobs_mode")
    mode = getattr(mode, "value", mode)  # an enum in some vLLM versions, a string in the server's JSON
    if mode is None:
        problems.append(
            "the engine does not report its `logprobs_mode` (vLLM older than 0.10.2?), so its log-probs are the "
            "raw model's, before temperature and top-k/top-p. Use vLLM >= 0.10.2"
            + (" and restart the server with `--logprobs-mode processed_logprobs`." if server else ".")
        )
    elif mode != PROCESSED:
        fix = (
            "Restart the server with `--logprobs-mode processed_logprobs` (`trl vllm-serve` sets it; a plain "
            "`vllm serve` defaults to `raw_logprobs`)."
            if server
            else "Build the engine with `logprobs_mode='processed_logprobs'` (TRL's colocate mode does)."
        )
        problems.append(
            f"the engine runs with `logprobs_mode={mode!r}`, but TRM needs `processed_logprobs`: the log-probs of "
            f"the distribution actually sampled from (after temperature and top-k/top-p). {fix}"
        )
    max_logprobs = model_config.get("max_logprobs")
    if max_logprobs is not None and max_logprobs != -1 and max_logprobs < requested:
        fix = (
            f"Restart the server with `--max-logprobs {requested}` or more (`-1` = unlimited, what `trl vllm-serve` "
            "sets)."
            if server
            else f"Use `trm_rollout_topk <= {max_logprobs}` (vLLM's default `max_logprobs` is 20 and TRL's colocate "
            "mode does not change it), or server mode with `--max-logprobs`."
        )
        problems.append(
            f"the engine allows {max_logprobs} log-probs per token (`max_logprobs`), but TRMTrainer requests "
            f"{requested} (`trm_rollout_topk`); vLLM would refuse every request. {fix}"
        )
    return problems


def check_vllm_logprobs(
    args: Any,
    vllm_generation: Any,
    vllm_mode: str,
    is_main_process: bool,
    broadcast: Callable[[list], Any],
    stacklevel: int = 2,
) -> None:
    """Check at start-up that vLLM will report the rollout log-probs TRM needs (`use_vllm=True`, no `rollout_func`).

    Three ways to get wrong or missing log-probs silently or late, each turned into an error naming the fix (a warning
    with `trm_mode="none"`, which only logs):

    * `generation_kwargs["logprobs"]` overrides the number of log-probs TRL requests from vLLM (`0`, or
      `trm_rollout_topk`); `None` means none at all, and TRL then fails at the first batch with a `TypeError`.
    * The engine's `logprobs_mode` must be `processed_logprobs`: the log-probs of the distribution actually
      sampled from (after temperature, top-k/top-p). Colocated engines get it from TRL; a server gets it from
      `trl vllm-serve`, but a plain `vllm serve` defaults to `raw_logprobs`.
    * The engine's `max_logprobs` (`-1` = unlimited) must be >= the number requested, else vLLM refuses every
      request at the first batch.

    A server's settings are read by the main process (`VLLMClient.get_server_info()`, the `/server_info` endpoint that
    `VLLM_SERVER_DEV_MODE=1` exposes, which TRL's weight sync needs anyway) and the verdict is broadcast (``broadcast``:
    Accelerate's `broadcast_object_list`), so every process stops with the same error instead of waiting in a
    collective.

    Args:
        args: the `TRMConfig`. vllm_generation: TRL's `VLLMGeneration`. vllm_mode: `"server"` or `"colocate"`.
        stacklevel: of the warning, counted from the caller of this function.
    """
    requested = max(int(args.trm_rollout_topk or 0), int(getattr(vllm_generation, "logprobs", 0) or 0))
    problems = []
    generation_kwargs = args.generation_kwargs or {}
    if "logprobs" in generation_kwargs and generation_kwargs["logprobs"] != requested:
        problems.append(
            f"`generation_kwargs['logprobs']={generation_kwargs['logprobs']!r}` overrides the {requested} top "
            "log-probs TRMTrainer requests from vLLM (0 = the sampled token's only; `trm_rollout_topk` sets "
            "more). Remove `logprobs` from `generation_kwargs`."
        )
    if vllm_mode == "server":
        verdict = [None]
        if is_main_process:
            model_config = vllm_generation.vllm_client.get_server_info().get("model_config") or {}
            verdict = [vllm_engine_problems(model_config, requested, server=True)]
        broadcast(verdict)
        problems += verdict[0]
    else:
        model_config = vllm_generation.llm.llm_engine.model_config
        fields = {key: getattr(model_config, key, None) for key in ("logprobs_mode", "max_logprobs")}
        problems += vllm_engine_problems(fields, requested, server=False)
    if not problems:
        return
    message = "vLLM will not report the rollout log-probs TRM needs:\n- " + "\n- ".join(problems)
    if args.trm_mode == "none":
        warnings.warn(message + "\nThe trm/ diagnostics would be wrong.", stacklevel=stacklevel + 1)
    else:
        raise ValueError(message)


def check_trainer_engine(trainer) -> None:
    """A `TRMTrainer`'s start-up check: with `use_vllm=True` and no `rollout_func`, vLLM must report the rollout
    log-probs TRM needs (:func:`check_vllm_logprobs`; the main process reads the engine and broadcasts what it found,
    so every process stops alike)."""
    if trainer.use_vllm and trainer.rollout_func is None:
        from accelerate.utils import broadcast_object_list

        main = trainer.accelerator.is_main_process
        check_vllm_logprobs(trainer.args, trainer.vllm_generation, trainer.vllm_mode, main, broadcast_object_list, 4)
