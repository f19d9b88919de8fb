"""The start-up checks of `TRMConfig` that refuse a combination of settings by name (called from
`TRMConfig.__post_init__`, in this order: `check_rollout_topk` and `parse_ratio_max` first, then after the thresholds are validated
`check_one_correction`, `check_old_policy`, `check_accept_rate_settings`). Kept apart so that `config.py` holds the
fields and their documentation."""

from __future__ import annotations

OLD_POLICIES = ("trainer", "rollout")
"""`TRMConfig.trm_old_policy` values: the old policy of TRL's PPO ratio."""


def check_rollout_topk(config) -> None:
    """`trm_rollout_topk` is an integer >= 0, and >= 1 for `trm_exact`."""
    topk = config.trm_rollout_topk
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(
            f"`trm_rollout_topk` must be an integer >= 0 (0 = no top-k capture), got {topk!r}. Use e.g. "
            "`trm_rollout_topk=20`."
        )
    if config.trm_mode == "trm_exact" and topk < 1:
        raise ValueError(
            "`trm_mode='trm_exact'` needs `trm_rollout_topk >= 1`: the per-token KL is computed from the rollout "
            "engine's top-k log-probs at every position, and `trm_rollout_topk=0` captures none. Set e.g. "
            "`trm_rollout_topk=20` (vLLM: start the server with `--max-logprobs 20` or more), or use "
            "`trm_mode='trm'`."
        )


def check_one_correction(config) -> None:
    """With `trm_mode != "none"`, TRL's own off-policy corrections must be off: exactly one is ever applied."""
    if config.trm_mode == "none":
        return
    if config.vllm_importance_sampling_correction:
        raise ValueError(
            f"`trm_mode={config.trm_mode!r}` and `vllm_importance_sampling_correction=True` would apply two "
            "off-policy corrections. Set `vllm_importance_sampling_correction=False` (TRM replaces it), or "
            "`trm_mode='none'` to keep TRL's correction and log TRM diagnostics only."
        )
    if config.off_policy_mask_threshold is not None:
        raise ValueError(
            f"`trm_mode={config.trm_mode!r}` and `off_policy_mask_threshold` would apply two off-policy "
            "corrections. Set `off_policy_mask_threshold=None`, or `trm_mode='none'`."
        )


def check_old_policy(config) -> None:
    """`trm_old_policy="rollout"` (π_old := π_roll) is refused, by name, where it cannot take effect."""
    policy = config.trm_old_policy
    if policy not in OLD_POLICIES:
        raise ValueError(f"Unknown `trm_old_policy` {policy!r}. Choose one of {list(OLD_POLICIES)}.")
    if policy == "trainer":
        return
    if config.trm_mode in ("token_tis", "seq_tis"):
        raise ValueError(
            f"`trm_old_policy='rollout'` makes the `{config.trm_mode}` weight (the truncated pi_old/pi_roll) exactly "
            "1, so the mode would do nothing: use `trm_mode='none'` (PPO's clip against pi_roll is the truncation), "
            "or `trm_old_policy='trainer'`."
        )
    if config.vllm_importance_sampling_correction:
        raise ValueError(
            "`trm_old_policy='rollout'` already makes TRL's ratio pi_theta/pi_roll; "
            "`vllm_importance_sampling_correction=True` would correct for pi_roll twice. Set it to False."
        )
    if config.loss_type == "vespo":
        raise ValueError(
            "`trm_old_policy='rollout'` is not supported with `loss_type='vespo'` (it builds its own sequence "
            "weights from TRL's ratio and importance-sampling ratio). Use another `loss_type`, or "
            "`trm_old_policy='trainer'`."
        )


def check_accept_rate_settings(config) -> None:
    """The accept-rate warning (`trm_accept_rate_floor` / `_patience`) and the adaptive controller
    (`trm_target_accept_rate`, `trm` mode only; its settings are validated now, not at the first step)."""
    if config.trm_accept_rate_floor is not None and not 0.0 < config.trm_accept_rate_floor <= 1.0:
        raise ValueError(
            f"`trm_accept_rate_floor` must lie in (0, 1] (or be None to disable the warning), got "
            f"{config.trm_accept_rate_floor}."
        )
    if config.trm_accept_rate_patience < 1:
        raise ValueError(f"`trm_accept_rate_patience` must be >= 1, got {config.trm_accept_rate_patience}.")
    if config.trm_target_accept_rate is not None:
        if config.trm_mode != "trm":
            raise ValueError(
                "`trm_target_accept_rate` steers `trm_delta_max`/`trm_delta_avg`, which only `trm_mode='trm'` "
                f"uses; got `trm_mode={config.trm_mode!r}`. Unset `trm_target_accept_rate` or use `trm_mode='trm'`."
            )
        config.make_adaptive_thresholds()  # validates the controller settings now, not at the first step
    config.make_startup_calibration()  # validates `trm_calibrate_*` now


def parse_ratio_max(config) -> None:
    """A string `trm_ratio_max` (the command line and YAML recipes give strings) becomes "auto" (`seq_tis` only),
    None or a float."""
    if not isinstance(config.trm_ratio_max, str):
        return
    text = config.trm_ratio_max.strip().lower()
    if text == "auto":
        if config.trm_mode != "seq_tis":
            raise ValueError(
                f"`trm_ratio_max='auto'` (the Seq-TIS optimal clip C*) is for `trm_mode='seq_tis'`; got "
                f"`trm_mode={config.trm_mode!r}`. Give a number, e.g. `trm_ratio_max=2.0`."
            )
        config.trm_ratio_max = "auto"
    elif text in ("none", "null"):
        config.trm_ratio_max = None
    else:
        try:
            config.trm_ratio_max = float(text)
        except ValueError:
            raise ValueError(
                f"`trm_ratio_max` must be a number, None or 'auto' (seq_tis), got {config.trm_ratio_max!r}."
            ) from None


def check_routing_replay(config) -> None:
    """`trm_routing_replay` is a bool (the model-dependent refusals run when the trainer is built:
    `trl_trm.routing.check_routing_setup`)."""
    if not isinstance(config.trm_routing_replay, bool):
        raise ValueError(f"`trm_routing_replay` must be True or False, got {config.trm_routing_replay!r}.")
