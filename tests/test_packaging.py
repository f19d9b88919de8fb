"""Packaging: one version source, the public exports, what the wheel ships (built here: ~2 s), the dependency floors
and extras against trl 1.16's own, LICENSE and CHANGELOG, and the one warning filter `trl_trm` installs."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import trl_trm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the `test` extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(dist: str) -> list[Requirement]:
    return [Requirement(r) for r in metadata.requires(dist) or []]


def _core(dist: str) -> dict[str, Requirement]:
    """The requirements of `dist` without an `extra` marker, by name."""
    return {r.name.lower(): r for r in _requirements(dist) if r.marker is None or "extra" not in str(r.marker)}


def _extra(dist: str, extra: str) -> dict[str, Requirement]:
    return {
        r.name.lower(): r
        for r in _requirements(dist)
        if r.marker is not None and r.marker.evaluate({"extra": extra}) and not r.marker.evaluate({"extra": ""})
    }


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert floors, f"{req} has no lower bound"
    return max(floors)


# ----------------------------------------------------------------------------------------------- version, exports
def test_version_has_one_source():
    assert "version" not in PYPROJECT["project"], "the version is written in pyproject.toml again"
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "trl_trm.__version__"}
    # The installed metadata (editable install) carries the same version as the package.
    assert metadata.version("trl-trm") == trl_trm.__version__
    Version(trl_trm.__version__)  # a valid PEP 440 version


def test_public_names_are_exported():
    from trl_trm.callbacks import TRMStatsCallback
    from trl_trm.config import TRMConfig
    from trl_trm.trainer import TRMTrainer

    assert trl_trm.TRMStatsCallback is TRMStatsCallback
    assert trl_trm.TRMConfig is TRMConfig and trl_trm.TRMTrainer is TRMTrainer
    assert {"TRMStatsCallback", "TRMConfig", "TRMTrainer"} <= set(trl_trm.__all__)
    for name in trl_trm.__all__:  # every advertised name resolves (`from trl_trm import *` works)
        assert getattr(trl_trm, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        trl_trm.Nope  # noqa: B018


# ----------------------------------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of what it is built from (the shared tree gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "trl_trm", src / "trl_trm", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_ships_py_typed_the_demo_recipe_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "trl_trm/py.typed" in names
        assert "trl_trm/recipes/demo.yaml" in names
        assert zf.read("trl_trm/recipes/demo.yaml").decode() == (ROOT / "recipes" / "demo.yaml").read_text()
        dist_info = f"trl_trm-{trl_trm.__version__}.dist-info"
        assert f"{dist_info}/licenses/LICENSE" in names
        meta = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert not any(n.startswith(("tests/", "recipes/", "benchmarks/", "experiments/")) for n in names), names
    assert re.search(rf"^Version: {re.escape(trl_trm.__version__)}$", meta, re.M)
    assert re.search(r"^License-Expression: Apache-2.0$", meta, re.M)
    assert re.search(r"^Requires-Dist: matplotlib>=[\d.]+$", meta, re.M), "matplotlib must be a core dependency"
    assert "trl-trm = trl_trm.cli:main" in entry_points


# ------------------------------------------------------------------------------------- dependencies and extras
def test_transformers_floor_has_trainer_end_and_is_not_below_trl():
    from transformers import Trainer

    ours = _floor(_core("trl-trm")["transformers"])
    assert ours >= _floor(_core("trl")["transformers"]), "our transformers floor is below trl's"
    # `Trainer.end()` (TRMTrainer.end, `trl-trm train`) first shipped in transformers 5.18.0 (5.17.0 has none).
    assert ours >= Version("5.18.0")
    assert callable(getattr(Trainer, "end", None))


def test_core_floors_are_not_below_trl():
    ours, theirs = _core("trl-trm"), _core("trl")
    for name in ("accelerate", "datasets", "numpy", "pyyaml"):
        assert _floor(ours[name]) >= _floor(theirs[name]), name
    assert "matplotlib" in ours


def test_deepspeed_extra_matches_trl():
    ours, theirs = _extra("trl-trm", "deepspeed"), _extra("trl", "deepspeed")
    assert str(ours["deepspeed"].specifier) == str(theirs["deepspeed"].specifier)


def test_vllm_extra_is_trls_and_admits_our_transformers_floor():
    ours, theirs = _extra("trl-trm", "vllm"), _extra("trl", "vllm")
    assert set(ours) == set(theirs) == {"vllm", "aiohttp", "requests"}
    for name in ours:
        assert str(ours[name].specifier) == str(theirs[name].specifier), name
    # From the wheels' metadata: vllm 0.31.0 requires transformers<5.18, 0.30.0 transformers>=5.10.4 (no cap) and
    # torch==2.13.0 (the Makefile's pin). So with our floor the extra resolves to 0.30.0, which must stay inside.
    assert ours["vllm"].specifier.contains("0.30.0")
    assert _floor(_core("trl-trm")["transformers"]) >= Version("5.10.4")


def test_every_tracker_a_recipe_reports_to_has_an_extra():
    import yaml

    extras = PYPROJECT["project"]["optional-dependencies"]
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        for tracker in yaml.safe_load(recipe.read_text()).get("report_to") or []:
            assert tracker in extras, f"{recipe.name} reports to {tracker}, which no extra installs"
            assert any(Requirement(r).name == tracker for r in extras[tracker])


# ------------------------------------------------------------------------------------------- LICENSE, CHANGELOG
def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    for section in range(1, 10):  # the nine numbered terms
        assert re.search(rf"^   {section}\. ", text, re.M), section
    assert "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


def test_changelog_has_unreleased_and_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert versions[0] == "Unreleased", versions
    assert versions[1] == trl_trm.__version__, "the newest released section must be the package version"
    assert re.search(rf"^## \[{re.escape(trl_trm.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)
    for heading in re.findall(r"^### (.+)$", text, re.M):  # Keep a Changelog's change types only
        assert heading in {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, heading


# --------------------------------------------------------------------------------------------- the Makefile set-up
def _make_dry_run(*args: str) -> str:
    """The commands `make` would run to (re)build the venv (`-n`: nothing runs; `-W`: as if pyproject changed)."""
    if shutil.which("make") is None:
        pytest.fail("`make` is not installed: the set-up (README) needs it")
    proc = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", ".venv/bin/trl-trm", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_installs_torch_first_from_the_index_asked_for():
    default = _make_dry_run().splitlines()
    pip = [line for line in default if "pip install" in line]
    assert pip[0].endswith("pip install -q torch==2.13.0"), pip  # torch alone, first, no index: offline here
    assert '-e ".[test,dev]" torch==2.13.0' in pip[1], pip
    assert "index-url" not in "".join(default)
    cpu = [line for line in _make_dry_run("TORCH_INDEX=https://download.pytorch.org/whl/cpu").splitlines()]
    pip = [line for line in cpu if "pip install" in line]
    assert pip[0].endswith("pip install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu")
    assert "index-url" not in pip[1]  # the rest comes from PyPI; the installed torch already satisfies the pin
    other = [line for line in _make_dry_run("TORCH=torch==2.12.1").splitlines() if "pip install" in line]
    assert other[0].endswith("pip install -q torch==2.12.1") and other[1].endswith("torch==2.12.1")


# ------------------------------------------------------------------------------------------------ warning filter
def _tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def test_trl_does_emit_the_warning_the_filter_hides():
    """The control: trl 1.16 on this transformers warns (once it stops, drop the filter in trl_trm/__init__.py)."""
    import warnings

    from trl.models.utils import disable_gradient_checkpointing

    model = _tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # above every filter, trl_trm's included
        with disable_gradient_checkpointing(model, None):  # what GRPOTrainer enters on every generation step
            pass
    hits = [
        w for w in caught if issubclass(w.category, FutureWarning) and "is_gradient_checkpointing" in str(w.message)
    ]
    assert hits, [str(w.message) for w in caught]
    assert re.match(r"`is_gradient_checkpointing` is deprecated", str(hits[0].message))
    assert Path(hits[0].filename).match("transformers/modeling_utils.py")  # the module the filter names


_AFTER_IMPORT = """
import warnings
import trl_trm
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments
from trl.models.utils import disable_gradient_checkpointing
cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1, head_dim=32)
with disable_gradient_checkpointing(Qwen2ForCausalLM(cfg), None):  # hidden: must not raise under -W error
    pass
try:  # any other FutureWarning still shows
    TrainingArguments(output_dir="unused", gradient_checkpointing=False, use_cpu=True, report_to=[])
except FutureWarning as err:
    print("still-raised:", err)
"""


@pytest.mark.slow  # a fresh interpreter importing transformers and trl: seconds
def test_import_trl_trm_hides_only_that_warning(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", _AFTER_IMPORT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "still-raised: `gradient_checkpointing` is deprecated" in proc.stdout, proc.stdout + proc.stderr[-2000:]
