"""`trl_trm.modes`: the correction modes, their documented defaults, the log-space weight band and the validation of
thresholds and input tensors (the messages name the argument; `TRMConfig` reuses them with the `trm_` prefix)."""

from __future__ import annotations

import math

import pytest
import torch

from trl_trm.modes import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    SEQUENCE_MASK_MODES,
    TRM_MODES,
    _check_inputs,
    _weight_band,
    validate_thresholds,
)

DEFAULTS = dict(
    delta_max=DEFAULT_DELTA_MAX,
    delta_avg=DEFAULT_DELTA_AVG,
    geo_low=DEFAULT_GEO_LOW,
    geo_high=DEFAULT_GEO_HIGH,
    ratio_min=None,
    ratio_max=DEFAULT_RATIO_MAX,
    delta_kl=DEFAULT_DELTA_KL,
)


def test_modes_and_documented_defaults():
    assert TRM_MODES == ("trm", "trm_exact", "geo_mask", "seq_mis", "seq_tis", "token_tis", "token_mis", "none")
    assert set(SEQUENCE_MASK_MODES) < set(TRM_MODES)
    assert DEFAULT_DELTA_MAX == math.log(2.0)  # every token ratio within [1/2, 2]
    assert (DEFAULT_DELTA_AVG, DEFAULT_GEO_LOW, DEFAULT_GEO_HIGH) == (0.01, 0.99, 1.01)
    assert (DEFAULT_DELTA_KL, DEFAULT_RATIO_MAX) == (1e-4, 2.0)


@pytest.mark.parametrize("mode", TRM_MODES)
def test_defaults_are_valid_in_every_mode(mode):
    validate_thresholds(mode, **DEFAULTS)
    validate_thresholds(mode, **DEFAULTS, name_prefix="trm_")


@pytest.mark.parametrize("prefix", ["", "trm_"])
def test_messages_name_the_prefixed_argument(prefix):
    with pytest.raises(ValueError, match=rf"`{prefix}geo_high` must be a positive"):
        validate_thresholds("geo_mask", **{**DEFAULTS, "geo_high": -1.0}, name_prefix=prefix)
    with pytest.raises(ValueError, match=rf"`{prefix}mode='trm_exact'` needs `{prefix}delta_kl`"):
        validate_thresholds("trm_exact", **{**DEFAULTS, "delta_kl": None}, name_prefix=prefix)
    with pytest.raises(ValueError, match=rf"`{prefix}ratio_max`=0.5"):
        validate_thresholds("seq_mis", **{**DEFAULTS, "ratio_max": 0.5}, name_prefix=prefix)


def test_weight_band_is_the_log_of_the_ratio_band():
    assert _weight_band("token_tis", None, 2.0) == (-math.inf, math.log(2.0))
    assert _weight_band("seq_tis", 0.5, 3.0) == (math.log(0.5), math.log(3.0))
    assert _weight_band("token_mis", None, 2.0) == (None, math.log(2.0))
    assert _weight_band("token_mis", 0.5, None) == (math.log(0.5), None)
    for mode in SEQUENCE_MASK_MODES + ("none",):  # no band: the mask modes weight by the completion mask
        assert _weight_band(mode, 0.5, 2.0) == (None, None)


def test_check_inputs_accepts_aligned_float_tensors_and_any_mask_dtype():
    x = torch.zeros(2, 3)
    for mask in (torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)):
        _check_inputs(x, x.bfloat16(), mask)
    with pytest.raises(ValueError, match=r"Mismatched shapes"):
        _check_inputs(x, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"`sampling_per_token_logps` must be a floating-point"):
        _check_inputs(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
