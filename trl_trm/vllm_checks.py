"""What a vLLM engine's configuration must say for TRM's rollout log-probs to be right (no vLLM import).

Used by `TRMTrainer._trm_check_vllm` at start-up, on a server's `/server_info` `model_config` (JSON) or on a colocated
engine's `ModelConfig` attributes. See docs/vllm.md.
"""

from __future__ import annotations

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
