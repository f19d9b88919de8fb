"""`TRMConfig`: `GRPOConfig` plus the `trm_*` fields of Trust Region Masking."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

from trl import GRPOConfig

from . import config_checks
from .config_checks import OLD_POLICIES
from .masking import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    TRM_MODES,
    validate_thresholds,
)

MASK_POLICIES = ("current", "generation")
_RATIO_MODES = ("seq_mis", "seq_tis", "token_tis", "token_mis")
# The modes whose math reads each mode-specific `trm_*` field (trl_trm/masks.py `_rejections`, trl_trm/modes.py
# `_weight_band`, trl_trm/estimator.py). A field missing here (trm_rollout_topk, trm_mask_policy, trm_nonfinite, ...)
# is used in every mode, `none` included.
USED_BY_MODES: dict[str, tuple[str, ...]] = {
    "trm_delta_max": ("trm",),
    "trm_delta_avg": ("trm", "trm_exact"),
    "trm_delta_kl": ("trm_exact",),
    "trm_geo_low": ("geo_mask",),
    "trm_geo_high": ("geo_mask",),
    "trm_ratio_min": _RATIO_MODES,
    "trm_ratio_max": _RATIO_MODES,
    "trm_ratio_factor": ("trm", "trm_exact", "geo_mask", "seq_mis", "token_mis"),
}
# Every masking mode is available in the trainer (`trm_exact` needs `trm_rollout_topk >= 1`).
TRAINER_MODES = TRM_MODES


@dataclass
class TRMConfig(GRPOConfig):
    r"""
    Configuration for [`TRMTrainer`]: every [`~trl.GRPOConfig`] field plus the `trm_*` fields below.

    Exactly one off-policy correction is ever applied. With `trm_mode != "none"`, TRL's own corrections must be off:
    `vllm_importance_sampling_correction` (whose default is switched to `False` here) and
    `off_policy_mask_threshold`. With `trm_mode="none"` TRM only logs its diagnostics, and TRL's correction may be
    switched on.

    Parameters:
        trm_mode (`str`, defaults to `"trm"`):
            Correction: `"trm"`, `"trm_exact"`, `"geo_mask"`, `"seq_mis"`, `"seq_tis"`, `"token_tis"`, `"token_mis"`
            or `"none"`. `"trm_exact"` rejects a sequence when max_t KL(π_roll(·|c_t) ‖ π_θ(·|c_t)) exceeds
            `trm_delta_kl` (and, if `trm_delta_avg` is set, when the mean k3 exceeds it); it needs
            `trm_rollout_topk >= 1`. See `docs/trm-exact.md`.
        trm_delta_max (`float` or `None`, defaults to `log(2) ≈ 0.693`):
            `trm`: reject a sequence when max_t |log ρ_t| exceeds it (every token ratio must lie in
            [e^-δ, e^δ] = [1/2, 2]). `None` switches the criterion off.
        trm_delta_avg (`float` or `None`, defaults to `0.01`):
            `trm` and `trm_exact`: reject when the mean per-token k3 = ρ - 1 - log ρ exceeds it (public k3 rejection
            presets use 0.01). `None` switches the criterion off.
        trm_delta_kl (`float`, defaults to `1e-4`):
            `trm_exact`: reject a sequence when max_t KL(π_roll(·|c_t) ‖ π_θ(·|c_t)) exceeds it (the talk's
            numerical example uses δ = 1e-4). With k < V the KL is computed from the rollout's top-k plus a "rest"
            bucket: a lower bound of the exact value.
        trm_rollout_topk (`int`, defaults to `0`):
            k, the number of most probable tokens (log-probs and ids) the rollout engine reports per completion
            position, carried through the batch (memory O(B·T·k)). Required (>= 1) by `trm_exact`; in other modes a
            k >= 1 adds the per-token KL metrics (`trm/kl_tok_*`). vLLM needs `--max-logprobs >= k` (server) or
            `max_logprobs >= k` (colocate, vLLM's default is 20); a `rollout_func` returns `topk_logprobs` and
            `topk_token_ids`. Exact (not a lower bound) when k >= the vocabulary size.
        trm_geo_low (`float` or `None`, defaults to `0.99`):
            `geo_mask`: keep when the geometric-mean ratio lies in [low, high] (Geo-Mask notes: 1 ± 0.001…0.01).
        trm_geo_high (`float` or `None`, defaults to `1.01`):
            The upper end of the `geo_mask` band.
        trm_ratio_min (`float` or `None`, defaults to `None`):
            The lower end of the band `trm_ratio_max` describes; `None` is off.
        trm_ratio_max (`float` or `None`, defaults to `2.0`):
            Band on ρ_t (`token_*`) or on the product ratio (`seq_*`): the rejection level of `*_mis` and the
            truncation level C of `*_tis` (C = 2 as in the TIS literature). `seq_tis` also accepts
            `trm_ratio_max="auto"`: per batch, C* = sqrt(2 (1 + χ²_seq)) with χ²_seq = mean_i e^{2 s_i} − 1 over the
            batch's sequences on every process (the bias/variance optimum of the seeds' `003_*`), logged as
            `trm/seq_tis_clip`.
        trm_ratio_factor (`bool`, defaults to `True`):
            The seeds' estimator: in the mask modes (`trm`, `trm_exact`, `geo_mask`, `seq_mis`, `token_mis`) an
            accepted token's loss term is weighted by the detached factor π_old/π_roll, so that inside TRL's PPO
            ratio r_t = π_θ/π_old its gradient is A·ρ_t·∇log π_θ (talk §4.5.1). `False` gives the plain 0/1 mask
            (gradient A·r_t·∇log π_θ, the behaviour of trl-trm 0.1.0). TIS modes always truncate π_old/π_roll.
        trm_mask_policy (`str`, defaults to `"current"`):
            Which π_θ the mask compares with π_roll: `"current"` evaluates it in every loss computation against the
            policy being optimised (it also covers staleness when `num_iterations > 1` or
            `steps_per_generation > 1`); `"generation"` evaluates it once, when the batch is generated.
        trm_target_accept_rate (`float` or `None`, defaults to `None`):
            Adaptive thresholds (off by default). When set, a bounded multiplicative controller rescales
            `trm_delta_max` and `trm_delta_avg` after every optimizer step toward this global accept rate (`trm` mode
            only): scale ← clip(scale · exp(rate · (target − accept)), min_scale, max_scale). The thresholds in use
            are logged as `trm/delta_max` and `trm/delta_avg`, and the controller state is saved in checkpoints.
        trm_calibrate_accept (`float` or `None`, defaults to `None`):
            Calibrated thresholds (off by default). When set, before the first optimiser step the trainer samples the
            first generation batch's prompts `trm_calibrate_batches` times, measures the mismatch, and sets the
            thresholds of `trm_mode` (`trm`, `trm_exact`, `geo_mask`, `seq_mis`) so that they accept this fraction
            of those sequences (docs/calibrate.md); they stay fixed for the run (logged as `trm/calibrated/*`,
            saved in checkpoints, recorded in the model card) and seed the adaptive controller when
            `trm_target_accept_rate` is set. A target that no threshold reaches stops the run with one line.
        trm_calibrate_batches (`int`, defaults to `1`):
            The number of generation batches sampled for `trm_calibrate_accept` (extra generations, once per run).
        trm_adapt_rate (`float`, defaults to `0.1`):
            Controller gain: log-scale step per unit of accept-rate error.
        trm_adapt_min_scale (`float`, defaults to `0.1`):
            Lower limit on the thresholds relative to their configured values.
        trm_adapt_max_scale (`float`, defaults to `10.0`):
            Upper limit on the thresholds relative to their configured values: the trust region is never widened
            beyond `max_scale` × the configured δ.
        trm_accept_rate_floor (`float` or `None`, defaults to `0.5`):
            [`TRMStatsCallback`] warns once when `trm/accept_rate` stays below the floor for `patience` consecutive
            logs: the thresholds are too tight for the rollout engine, or the engines have drifted apart. `None`
            disables the warning.
        trm_accept_rate_patience (`int`, defaults to `3`):
            The number of consecutive logs below `trm_accept_rate_floor` before that warning.
        trm_plot (`bool`, defaults to `True`):
            Save `OUTPUT_DIR/trm_stats.png` (reward and `trm/` metrics over steps) at the end of training.
        trm_old_policy (`str`, defaults to `"trainer"`):
            The old policy π_old of TRL's PPO ratio r_t = π_θ/π_old. `"trainer"`: TRL's own (the training engine at
            generation time; the mask modes then weight accepted tokens by π_old/π_roll). `"rollout"` (the "bypass" of
            verl, prime-rl's and Tinker's default; the seeds' PPO baseline): π_old := π_roll, so the ratio is
            π_θ/π_roll, clipped against the rollout policy, the ρ factor is 1 (mask modes weight by the 0/1 mask), and
            the old-log-prob forward TRL runs when `steps_per_generation * num_iterations` does not divide
            `gradient_accumulation_steps` (e.g. `num_iterations > 1`) is skipped. Needs rollout log-probs; refused with `"token_tis"`/`"seq_tis"`
            (their weight would be exactly 1: use `"none"`), `vllm_importance_sampling_correction`, `loss_type="vespo"`
            and sampler processors (top-k, top-p, ...). See docs/modes.md.
        trm_nonfinite (`str`, defaults to `"reject"`):
            A sequence with a NaN/inf log-prob cannot be certified: `"reject"` rejects it (counted in
            `trm/nonfinite_frac`), `"raise"` stops training with an error.
        trm_routing_replay (`bool`, defaults to `False`):
            MoE rollout routing replay (R3): the training forwards use the experts that transformers generation chose
            for each token and layer (the prefill's for prompt tokens), with the gate weights recomputed over them
            (differentiable). Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral and GPT-OSS routers; refused at start-up with
            vLLM, a `rollout_func`, continuous batching, tools / environments and other routers. See docs/moe.md.

    A setting that the chosen `trm_mode` ignores (e.g. `trm_delta_max` with `trm_mode="seq_mis"`, `trm_geo_low` with
    `"trm"`, `trm_adapt_rate` without `trm_target_accept_rate`) is named in one `UserWarning` when the config is
    built ([`USED_BY_MODES`] lists which mode reads which field). A dataclass cannot tell a field that was set from one
    left at its default: a value equal to the field's default counts as not set and is never warned about.
    """

    trm_mode: str = field(
        default="trm",
        metadata={"help": "Correction mode.", "choices": list(TRAINER_MODES)},
    )
    trm_delta_max: float | None = field(
        default=DEFAULT_DELTA_MAX,
        metadata={
            "help": "TRM max criterion: reject a sequence when max_t |log rho_t| > trm_delta_max. Default log(2): "
            "every token ratio in [1/2, 2]. None switches it off."
        },
    )
    trm_delta_avg: float | None = field(
        default=DEFAULT_DELTA_AVG,
        metadata={
            "help": "TRM average criterion: reject when mean_t k3(rho_t) > trm_delta_avg. Default 0.01 (public k3 "
            "rejection presets). None switches it off."
        },
    )
    trm_delta_kl: float = field(
        default=DEFAULT_DELTA_KL,
        metadata={
            "help": "trm_exact: reject a sequence when max_t KL(pi_roll || pi_theta) > trm_delta_kl. Default 1e-4 "
            "(the TRM talk's numerical example). From a top-k (k < V) the KL is a lower bound."
        },
    )
    trm_rollout_topk: int = field(
        default=0,
        metadata={
            "help": "Number k of top log-probs (with token ids) the rollout engine reports per completion token, "
            "carried through the batch (O(B*T*k) memory). Required (>= 1) by trm_mode='trm_exact'; in other modes it "
            "adds the trm/kl_tok_* metrics. vLLM needs max_logprobs >= k (server: --max-logprobs)."
        },
    )
    trm_geo_low: float | None = field(
        default=DEFAULT_GEO_LOW,
        metadata={"help": "Geo-Mask lower bound on the geometric-mean ratio. None switches it off."},
    )
    trm_geo_high: float | None = field(
        default=DEFAULT_GEO_HIGH,
        metadata={"help": "Geo-Mask upper bound on the geometric-mean ratio. None switches it off."},
    )
    trm_ratio_min: float | None = field(
        default=None,
        metadata={"help": "Lower band on rho_t (token modes) or the product ratio (seq modes). None is off."},
    )
    trm_ratio_max: float | str | None = field(
        default=DEFAULT_RATIO_MAX,
        metadata={
            "help": "Upper band / truncation level C on rho_t (token modes) or the product ratio (seq modes). "
            "seq_tis also takes 'auto': C* = sqrt(2 (1 + chi2_seq)) per batch (logged as trm/seq_tis_clip)."
        },
    )
    trm_ratio_factor: bool = field(
        default=True,
        metadata={
            "help": "Mask modes: weight accepted tokens by the detached pi_old/pi_roll, so the gradient is "
            "A * rho_t * grad log pi_theta (the seeds' estimator). False: plain 0/1 mask."
        },
    )
    trm_mask_policy: str = field(
        default="current",
        metadata={
            "help": "Which policy the mask is evaluated against: 'current' (at every optimisation step, default) "
            "or 'generation' (once, when the batch is generated).",
            "choices": list(MASK_POLICIES),
        },
    )
    trm_old_policy: str = field(
        default="trainer",
        metadata={
            "help": "The old policy of TRL's PPO ratio: 'trainer' (TRL's, default) or 'rollout' (pi_old := pi_roll, "
            "the 'bypass' PPO baseline: the ratio pi_theta/pi_roll is clipped against the rollout policy, and TRL's "
            "old-log-prob forward is skipped).",
            "choices": list(OLD_POLICIES),
        },
    )
    trm_nonfinite: str = field(
        default="reject",
        metadata={
            "help": "Sequences with NaN/inf log-probs: 'reject' (default, counted in trm/nonfinite_frac) or 'raise'.",
            "choices": ["reject", "raise"],
        },
    )
    trm_routing_replay: bool = field(
        default=False,
        metadata={
            "help": "MoE: force the experts transformers generation chose (per token and layer) in the training "
            "forwards, gate weights recomputed over them (rollout routing replay). See docs/moe.md."
        },
    )
    trm_target_accept_rate: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive thresholds: target global accept rate in (0, 1]. None (default) = fixed thresholds."
        },
    )
    trm_calibrate_accept: float | None = field(
        default=None,
        metadata={
            "help": "Calibrated thresholds: before the first optimiser step, set trm_mode's thresholds so that they "
            "accept this fraction of trm_calibrate_batches sampled batches, in (0, 1]. None (default) = as configured."
        },
    )
    trm_calibrate_batches: int = field(
        default=1, metadata={"help": "Generation batches sampled for trm_calibrate_accept (once per run)."}
    )
    trm_adapt_rate: float = field(
        default=0.1, metadata={"help": "Adaptive thresholds: log-scale step per unit of accept-rate error."}
    )
    trm_adapt_min_scale: float = field(
        default=0.1, metadata={"help": "Adaptive thresholds: smallest threshold, relative to the configured one."}
    )
    trm_adapt_max_scale: float = field(
        default=10.0, metadata={"help": "Adaptive thresholds: largest threshold, relative to the configured one."}
    )
    trm_accept_rate_floor: float | None = field(
        default=0.5,
        metadata={
            "help": "TRMStatsCallback warns once when trm/accept_rate stays below this for trm_accept_rate_patience "
            "consecutive logs (thresholds too tight, or engines drifted). None disables the warning."
        },
    )
    trm_accept_rate_patience: int = field(
        default=3, metadata={"help": "Consecutive low-accept-rate logs before TRMStatsCallback warns."}
    )
    trm_plot: bool = field(
        default=True,
        metadata={"help": "Save OUTPUT_DIR/trm_stats.png (reward and trm/ metrics over steps) when training ends."},
    )
    # TRL's own vLLM correction would stack on top of TRM: off by default here (GRPOConfig defaults it to True).
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "TRL's own vLLM importance-sampling correction. Must stay False unless trm_mode='none': exactly "
            "one correction is applied."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        config_checks.check_rollout_topk(self)
        config_checks.parse_ratio_max(self)
        if not isinstance(self.trm_ratio_factor, bool):
            raise ValueError(f"`trm_ratio_factor` must be True or False, got {self.trm_ratio_factor!r}.")
        validate_thresholds(
            self.trm_mode,
            delta_max=self.trm_delta_max,
            delta_avg=self.trm_delta_avg,
            geo_low=self.trm_geo_low,
            geo_high=self.trm_geo_high,
            ratio_min=self.trm_ratio_min,
            ratio_max=DEFAULT_RATIO_MAX if self.trm_ratio_max == "auto" else self.trm_ratio_max,
            delta_kl=self.trm_delta_kl,
            name_prefix="trm_",
        )
        if self.trm_mask_policy not in MASK_POLICIES:
            raise ValueError(
                f"Unknown `trm_mask_policy` {self.trm_mask_policy!r}. Choose one of {list(MASK_POLICIES)}."
            )
        if self.trm_nonfinite not in ("reject", "raise"):
            raise ValueError(f"Unknown `trm_nonfinite` {self.trm_nonfinite!r}. Choose 'reject' or 'raise'.")
        config_checks.check_routing_replay(self)
        config_checks.check_one_correction(self)
        config_checks.check_old_policy(self)
        config_checks.check_accept_rate_settings(self)
        self._trm_warn_ignored_settings()
        if self.loss_type == "vespo" and self.trm_mode != "none":
            raise ValueError(
                "`loss_type='vespo'` applies its own sequence-level importance weighting; it cannot be combined with "
                f"`trm_mode={self.trm_mode!r}`. Use another `loss_type`, or `trm_mode='none'`."
            )

    def _trm_ignored_settings(self) -> list[str]:
        """``"field=value (used by ...)"`` for every `trm_*` field set to a non-default value that nothing reads under
        this config (a value equal to the default counts as not set: dataclass fields cannot tell the two apart)."""
        defaults = {f.name: f.default for f in fields(self)}
        ignored = [
            (name, f"used by trm_mode {' / '.join(repr(m) for m in modes)}")
            for name, modes in USED_BY_MODES.items()
            if self.trm_mode not in modes
        ]
        if self.trm_target_accept_rate is None:
            reason = "used only with trm_target_accept_rate set"
            ignored += [(name, reason) for name in ("trm_adapt_rate", "trm_adapt_min_scale", "trm_adapt_max_scale")]
        if self.trm_calibrate_accept is None:
            ignored.append(("trm_calibrate_batches", "used only with trm_calibrate_accept set"))
        if self.trm_accept_rate_floor is None:
            ignored.append(("trm_accept_rate_patience", "used only with trm_accept_rate_floor set"))
        if self.trm_old_policy == "rollout":
            ignored.append(("trm_ratio_factor", "pi_old/pi_roll is 1 with trm_old_policy='rollout'"))
        return [
            f"{name}={getattr(self, name)!r} ({reason})"
            for name, reason in ignored
            if getattr(self, name) != defaults[name]
        ]

    def _trm_warn_ignored_settings(self) -> None:
        """One `UserWarning` naming every setting this config ignores (see the class docstring)."""
        ignored = self._trm_ignored_settings()
        if ignored:
            warnings.warn(
                f"trm_mode={self.trm_mode!r} ignores {'; '.join(ignored)}. Remove {'it' if len(ignored) == 1 else 'them'}"
                ", or choose the mode that uses it.",
                UserWarning,
                stacklevel=4,  # the caller of TRMConfig(...)
            )

    def make_startup_calibration(self):
        """The calibration configured by `trm_calibrate_accept` / `trm_calibrate_batches` (None when off)."""
        from .calibration import CALIBRATED_MODES

        if self.trm_calibrate_accept is None:
            return None
        target, batches = self.trm_calibrate_accept, self.trm_calibrate_batches
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise ValueError(f"`trm_calibrate_accept` must lie in (0, 1] (or be None: off), got {target!r}.")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"`trm_calibrate_batches` must be an integer >= 1, got {batches!r}.")
        if self.trm_mode not in CALIBRATED_MODES:
            raise ValueError(
                f"`trm_calibrate_accept` sets the thresholds of {list(CALIBRATED_MODES)}; `trm_mode="
                f"{self.trm_mode!r}` has none to set. Unset `trm_calibrate_accept` or choose one of those modes."
            )
        from .calibrate import StartupCalibration

        return StartupCalibration(float(target), batches, self.trm_mode)

    def make_adaptive_thresholds(self):
        """The threshold controller configured by the `trm_target_accept_rate` / `trm_adapt_*` fields."""
        from .adaptive import AdaptiveThresholds

        return AdaptiveThresholds(
            target_accept_rate=self.trm_target_accept_rate,
            initial_delta_max=self.trm_delta_max,
            initial_delta_avg=self.trm_delta_avg,
            rate=self.trm_adapt_rate,
            min_scale=self.trm_adapt_min_scale,
            max_scale=self.trm_adapt_max_scale,
        )
