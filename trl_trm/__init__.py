"""Trust Region Masking (TRM) for TRL: sequence-level masking against rollout/training mismatch.

`trl_trm.masking` and `trl_trm.bounds` are pure torch and import nothing from TRL; `TRMConfig` and `TRMTrainer`
are imported lazily so the math can be used without TRL installed.
"""

from .masking import TRM_MODES, TrustRegionMaskOutput, compute_trust_region_mask, summarize_mask_stats

__version__ = "0.1.0"

__all__ = [
    "TRM_MODES",
    "TRMConfig",
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
    raise AttributeError(f"module 'trl_trm' has no attribute {name!r}")
