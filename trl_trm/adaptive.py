"""Adaptive TRM thresholds: a bounded multiplicative controller that steers the accept rate toward a target.

TRM rejects a whole sequence when its mismatch statistics exceed the thresholds ``delta_max`` (on
``D_max = max_t |log rho_t|``) and ``delta_avg`` (on ``D_avg = mean_t k3(rho_t)``), see ``shared/trm-spec.md``.
Fixed thresholds can reject far more (or fewer) sequences than intended when the rollout/training mismatch
drifts during training. :class:`AdaptiveThresholds` multiplies both configured thresholds by one common
``scale`` and, after every batch, moves that scale toward the value at which the observed accept rate (fraction
of sequences kept) equals ``target_accept_rate``::

    scale <- clip(scale * exp(rate * (target_accept_rate - accept_rate)), min_scale, max_scale)
    delta_max = initial_delta_max * scale,   delta_avg = initial_delta_avg * scale

Accepting fewer sequences than targeted loosens the thresholds (scale grows); accepting more tightens them.

Why bounded and multiplicative:

* The thresholds are scale parameters (a bound on a log-ratio and on a KL estimate), so the natural step is a
  relative one: a multiplicative step (an additive step on ``log scale``) keeps them strictly positive and makes
  the gain ``rate`` mean the same thing whatever the units or magnitude of the configured values.
* Clipping ``scale`` to ``[min_scale, max_scale]`` bounds how far the controller can widen the trust region. The
  masked objective's error bound is stated for the threshold δ that is actually enforced, so with adaptation on
  it holds with δ at most ``max_scale`` times the configured value (and the thresholds never shrink below
  ``min_scale`` times it, so the controller cannot reject everything in reaction to one noisy batch).
  ``max_scale=1`` gives a controller that may only tighten the configured trust region.

A ``NaN`` accept rate (e.g. a batch with no sequences) is ignored. The state (``scale``, ``num_updates``) is
saved with the configuration in ``trm_adaptive_state.json`` so that a resumed run continues with exactly the same
thresholds, and a resume under a different configuration is refused.

Adaptation is off by default: unless a controller is created (``trm_target_accept_rate`` is set), the thresholds
are the fixed configured values. This module is pure Python and imports neither torch nor TRL.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

STATE_FILE_NAME = "trm_adaptive_state.json"
"""File written by :meth:`AdaptiveThresholds.save` inside a checkpoint directory."""

STATE_VERSION = 1

# Dataclass field -> TRMConfig field, for error messages that point at what the user actually set.
_CONFIG_NAMES = {
    "target_accept_rate": "trm_target_accept_rate",
    "initial_delta_max": "trm_delta_max",
    "initial_delta_avg": "trm_delta_avg",
    "rate": "trm_adapt_rate",
    "min_scale": "trm_adapt_min_scale",
    "max_scale": "trm_adapt_max_scale",
}
_CONFIG_FIELDS = tuple(_CONFIG_NAMES)
_STATE_FIELDS = ("scale", "num_updates")


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


@dataclass
class AdaptiveThresholds:
    """Bounded multiplicative controller that steers TRM thresholds toward a target accept rate.

    Args:
        target_accept_rate: desired fraction of sequences kept per batch, in (0, 1] (`trm_target_accept_rate`).
        initial_delta_max: configured threshold on max_t |log rho_t| (`trm_delta_max`), or None (criterion off).
        initial_delta_avg: configured threshold on mean_t k3(rho_t) (`trm_delta_avg`), or None (criterion off).
        rate: gain, the step of log(scale) per unit of accept-rate error (`trm_adapt_rate`), > 0.
        min_scale: lower limit on scale = delta / initial_delta, 0 < min_scale <= 1 (`trm_adapt_min_scale`).
        max_scale: upper limit on scale = delta / initial_delta, max_scale >= 1 (`trm_adapt_max_scale`).
        scale: current multiplier (state; starts at 1, i.e. the configured thresholds).
        num_updates: number of accept rates applied so far (state; NaN accept rates are not counted).
    """

    target_accept_rate: float
    initial_delta_max: float | None
    initial_delta_avg: float | None
    rate: float = 0.1
    min_scale: float = 0.1
    max_scale: float = 10.0
    scale: float = 1.0
    num_updates: int = 0

    def __post_init__(self) -> None:
        n = _CONFIG_NAMES
        self.target_accept_rate = _finite_number(n["target_accept_rate"], self.target_accept_rate)
        if not 0.0 < self.target_accept_rate <= 1.0:
            raise ValueError(
                f"`{n['target_accept_rate']}` must be in (0, 1] (a fraction of sequences kept), "
                f"got {self.target_accept_rate}."
            )
        for attr in ("initial_delta_max", "initial_delta_avg"):
            value = getattr(self, attr)
            if value is None:
                continue
            value = _finite_number(n[attr], value)
            if value <= 0.0:
                raise ValueError(f"`{n[attr]}` must be positive (or None to switch the criterion off), got {value}.")
            setattr(self, attr, value)
        if self.initial_delta_max is None and self.initial_delta_avg is None:
            raise ValueError(
                f"Adaptive thresholds need at least one of `{n['initial_delta_max']}` and `{n['initial_delta_avg']}`; "
                "both are None, so there is nothing to adapt."
            )
        self.rate = _finite_number(n["rate"], self.rate)
        if self.rate <= 0.0:
            raise ValueError(f"`{n['rate']}` must be > 0, got {self.rate}.")
        self.min_scale = _finite_number(n["min_scale"], self.min_scale)
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"`{n['min_scale']}` must be in (0, 1], got {self.min_scale}.")
        self.max_scale = _finite_number(n["max_scale"], self.max_scale)
        if self.max_scale < 1.0:
            raise ValueError(f"`{n['max_scale']}` must be >= 1, got {self.max_scale}.")
        self.scale = _finite_number("scale", self.scale)
        if not self.min_scale <= self.scale <= self.max_scale:
            raise ValueError(
                f"`scale` must lie in [{n['min_scale']}, {n['max_scale']}] = [{self.min_scale}, {self.max_scale}], "
                f"got {self.scale}."
            )
        if isinstance(self.num_updates, bool) or not isinstance(self.num_updates, int) or self.num_updates < 0:
            raise ValueError(f"`num_updates` must be a non-negative integer, got {self.num_updates!r}.")

    @property
    def delta_max(self) -> float | None:
        """Current threshold on max_t |log rho_t| (None when that criterion is off)."""
        return None if self.initial_delta_max is None else self.initial_delta_max * self.scale

    @property
    def delta_avg(self) -> float | None:
        """Current threshold on mean_t k3(rho_t) (None when that criterion is off)."""
        return None if self.initial_delta_avg is None else self.initial_delta_avg * self.scale

    def update(self, accept_rate: float | None) -> None:
        """Apply one observed accept rate (fraction of sequences kept in a batch, in [0, 1]).

        ``scale <- clip(scale * exp(rate * (target_accept_rate - accept_rate)), min_scale, max_scale)``.
        A NaN or None accept rate (e.g. an empty batch) is ignored: neither ``scale`` nor ``num_updates`` changes.
        """
        if accept_rate is None:
            return
        value = float(accept_rate)
        if math.isnan(value):
            return
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`accept_rate` must be in [0, 1] (a fraction of sequences kept), got {accept_rate!r}.")
        step = math.exp(self.rate * (self.target_accept_rate - value))
        self.scale = min(max(self.scale * step, self.min_scale), self.max_scale)
        self.num_updates += 1

    # ------------------------------------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the configuration (to detect a mismatch on resume) and ``scale``/``num_updates``."""
        state: dict[str, Any] = {"version": STATE_VERSION}
        for name in _CONFIG_FIELDS + _STATE_FIELDS:
            state[name] = getattr(self, name)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``scale`` and ``num_updates`` from :meth:`state_dict`.

        Raises ``ValueError`` naming the field when the saved configuration differs from this controller's (resuming
        under a different target, initial thresholds, gain or limits would not continue the saved run), or when the
        state is malformed.
        """
        if not isinstance(state, dict):
            raise ValueError(f"Adaptive-threshold state must be a dict, got {type(state).__name__}.")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"Unsupported adaptive-threshold state version {version!r} (expected {STATE_VERSION}).")
        missing = [name for name in _CONFIG_FIELDS + _STATE_FIELDS if name not in state]
        if missing:
            raise ValueError(f"Adaptive-threshold state is missing {missing}.")
        for name in _CONFIG_FIELDS:
            saved, current = state[name], getattr(self, name)  # config values are floats or None (__post_init__)
            if saved != current:
                raise ValueError(
                    f"Cannot resume adaptive TRM thresholds: `{_CONFIG_NAMES[name]}` was {saved!r} in the saved state "
                    f"but is {current!r} now. Use the configuration of the saved run, or start without its "
                    f"`{STATE_FILE_NAME}`."
                )
        scale = _finite_number("scale", state["scale"])
        if not self.min_scale <= scale <= self.max_scale:
            raise ValueError(f"Saved `scale`={scale} lies outside [{self.min_scale}, {self.max_scale}].")
        num_updates = state["num_updates"]
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"Saved `num_updates` must be a non-negative integer, got {num_updates!r}.")
        self.scale = scale
        self.num_updates = num_updates

    def save(self, directory: str | os.PathLike) -> str:
        """Write :meth:`state_dict` to ``directory/trm_adaptive_state.json`` (atomically); return the file path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), STATE_FILE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state_dict(), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        """Restore the state saved by :meth:`save` in ``directory`` into this controller (see :meth:`load_state_dict`).

        Raises ``FileNotFoundError`` naming the path when ``directory`` holds no ``trm_adaptive_state.json``, and
        ``ValueError`` naming the file and the fix when it is cut short (not valid JSON) or does not match.
        """
        path = os.path.join(os.fspath(directory), STATE_FILE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No adaptive TRM threshold state at {path}.")
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                where = f" (line {err.lineno}: {err.msg})" if isinstance(err, json.JSONDecodeError) else ""
                raise ValueError(
                    f"{path} is not valid JSON{where}: the checkpoint was cut short while saving (a crash or a full "
                    "disk). Resume from an earlier complete checkpoint (`resume_from_checkpoint: true` with "
                    "`trl-trm train` skips incomplete ones), or start without it."
                ) from None
        try:
            self.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
