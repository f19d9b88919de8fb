"""Trust Region Masking (TRM) for TRL: sequence-level masking against rollout/training mismatch.

`trl_trm.masking` and `trl_trm.bounds` (the math) and `trl_trm.window` (the `trm/` logging window) are pure torch
and import nothing from TRL; `TRMConfig`, `TRMTrainer` and `TRMStatsCallback` are imported lazily so the math can be
used without TRL installed. `TRMTrainer` (`trl_trm.trainer`) only wires TRL's seams to those collaborators.
"""

import warnings

from .masking import TRM_MODES, TrustRegionMaskOutput, compute_trust_region_mask, summarize_mask_stats

# The one place the version is written: pyproject.toml reads it (`[tool.setuptools.dynamic]`), tested against the
# installed metadata in tests/test_packaging.py.
__version__ = "0.1.0"

# trl 1.16's `disable_gradient_checkpointing` (entered on every generation step of GRPOTrainer) reads
# `model.is_gradient_checkpointing`, which transformers >= 5.23 deprecates in favour of `is_activation_checkpointing`.
# The FutureWarning names trl's call, which no user can change: hide exactly that message, nothing else.
warnings.filterwarnings(
    "ignore",
    message=r"`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module=r"transformers\.modeling_utils",
)

__all__ = [
    "TRM_MODES",
    "TRMConfig",
    "TRMStatsCallback",
    "TRMTrainer",
    "TrustRegionMaskOutput",
    "compute_trust_region_mask",
    "summarize_mask_stats",
]


def __getattr__(name):
    if name == "TRMConfig":
        from .config import TRMConfig

        return TRMConfig
    if name == "TRMTrainer":
        from .trainer import TRMTrainer

        return TRMTrainer
    if name == "TRMStatsCallback":
        from .callbacks import TRMStatsCallback

        return TRMStatsCallback
    raise AttributeError(f"module 'trl_trm' has no attribute {name!r}")
