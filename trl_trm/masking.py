"""Trust Region Masking's math, one import away (pure torch, no TRL import): the public facade of the math layer.

Every name lives in the module whose name says its job, and is re-exported here so that
``from trl_trm.masking import X`` keeps working:

- :mod:`trl_trm.modes`: the correction modes (:data:`TRM_MODES`), their default thresholds and
  :func:`validate_thresholds`;
- :mod:`trl_trm.masks`: :func:`compute_trust_region_mask` and its :class:`TrustRegionMaskOutput` (the definitions and
  the modes table are in that module's docstring);
- :mod:`trl_trm.row_blocks`: the CPU row-block loop behind it (patch ``_fill_row_block`` and ``_CPU_BLOCK_THREADS``
  there, where the loop reads them);
- :mod:`trl_trm.estimator`: the loss weights of the seeds' estimator (:func:`estimator_weights`), the Seq-TIS automatic
  clip, and the batch entry point :func:`mask_and_weights` (mask and loss weights of one batch in one call);
- :mod:`trl_trm.diagnostics`: variance sums, ESS, per-token KL and chi^2 from stored top-k log-probs, error-bound
  estimates, and :func:`summarize_mask_stats` (per-sequence statistics to ``trm/`` metrics).

Dependencies point one way: ``modes`` <- ``row_blocks`` <- ``diagnostics`` <- ``masks`` <- ``estimator``.
"""

from __future__ import annotations

# The private helpers are re-exported under their old import path too (`x as x`; tests import `_check_inputs` and
# `_weight_band` from here). The CPU loop's patch points, `_fill_row_block`, `_CPU_BLOCK_THREADS` and
# `_CPU_BLOCK_ELEMENTS`, are deliberately not: the loop reads them from `trl_trm.row_blocks`, so a patched copy here
# would silently change nothing.
from .diagnostics import _bound_estimates as _bound_estimates
from .diagnostics import _safe_max as _safe_max
from .diagnostics import _safe_mean as _safe_mean
from .diagnostics import _safe_min as _safe_min
from .diagnostics import _topk_distributions as _topk_distributions
from .diagnostics import _TopKDistributions as _TopKDistributions
from .diagnostics import _variance_sums as _variance_sums
from .diagnostics import effective_sample_size, summarize_mask_stats, topk_token_chi2, topk_token_kl
from .estimator import (
    estimator_weights,
    mask_and_weights,
    old_seq_log_ratio,
    seq_tis_auto_clip,
    seq_tis_auto_log_clip,
)
from .masks import TrustRegionMaskOutput, compute_trust_region_mask
from .modes import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    SEQUENCE_MASK_MODES,
    TRM_MODES,
    validate_thresholds,
)
from .modes import _check_inputs as _check_inputs
from .modes import _check_positive as _check_positive
from .modes import _weight_band as _weight_band
from .row_blocks import _BlockStats as _BlockStats
from .row_blocks import _row_blocks as _row_blocks

__all__ = [
    "DEFAULT_DELTA_AVG",
    "DEFAULT_DELTA_KL",
    "DEFAULT_DELTA_MAX",
    "DEFAULT_GEO_HIGH",
    "DEFAULT_GEO_LOW",
    "DEFAULT_RATIO_MAX",
    "SEQUENCE_MASK_MODES",
    "TRM_MODES",
    "TrustRegionMaskOutput",
    "compute_trust_region_mask",
    "effective_sample_size",
    "estimator_weights",
    "mask_and_weights",
    "old_seq_log_ratio",
    "seq_tis_auto_clip",
    "seq_tis_auto_log_clip",
    "summarize_mask_stats",
    "topk_token_chi2",
    "topk_token_kl",
    "validate_thresholds",
]
