"""The math layer's layout: the facades (`trl_trm.masking`, `trl_trm.longhorizon`) re-export the very objects of the
modules that define them, every math module imports on its own (no import cycle), and none imports TRL."""

from __future__ import annotations

import subprocess
import sys

import pytest

import trl_trm.masking as masking

MATH_MODULES = [
    "modes",
    "row_blocks",
    "diagnostics",
    "masks",
    "estimator",
    "masking",
    "state_machine",
    "longhorizon",
    "calibration",
]

HOMES = {
    "modes": ["TRM_MODES", "SEQUENCE_MASK_MODES", "DEFAULT_DELTA_MAX", "validate_thresholds", "_check_inputs"],
    "masks": ["TrustRegionMaskOutput", "compute_trust_region_mask"],
    "estimator": ["estimator_weights", "mask_and_weights", "seq_tis_auto_log_clip"],
    "diagnostics": ["summarize_mask_stats", "effective_sample_size", "topk_token_kl", "topk_token_chi2"],
    "row_blocks": ["_row_blocks", "_BlockStats"],
}


@pytest.mark.parametrize("module", sorted(HOMES))
def test_masking_reexports_the_defining_objects(module):
    home = __import__(f"trl_trm.{module}", fromlist=["_"])
    for name in HOMES[module]:
        assert getattr(masking, name) is getattr(home, name), name


def test_masking_all_is_importable():
    for name in masking.__all__:
        assert getattr(masking, name) is not None


def test_longhorizon_reexports_the_state_machine():
    from trl_trm import longhorizon, state_machine

    for name in ("StateMachine", "sample", "path_kl", "from_tabular", "random_machine", "kl_per_context"):
        assert getattr(longhorizon, name) is getattr(state_machine, name), name
    assert set(longhorizon.__all__) >= {"exact_quantities", "sample", "StateMachine"}


def test_each_math_module_imports_alone_without_trl():
    code = (
        "import importlib, sys\n"
        f"for name in {MATH_MODULES!r}:\n"
        "    for key in [k for k in sys.modules if k.startswith('trl_trm')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module('trl_trm.' + name)\n"
        "    assert 'trl' not in sys.modules, name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
