"""`trl_trm.recipe`: a recipe file is read strictly (its line named for a syntax error or a duplicate key), flags
override it, unknown keys and flags are named, and `accelerate launch` options are split off for the relaunch.
(tests/test_recipes.py checks the shipped recipes themselves.)"""

from __future__ import annotations

import pytest

from trl_trm.recipe import _split_config_flag, load_recipe_yaml, parse_command, parse_recipe

RECIPE = "model_name_or_path: builtin:tiny\ndataset_name: builtin:reversal\nreward_funcs: [reversal]\nuse_cpu: true\n"


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", r"line 3: duplicate key 'a' \(first set on line 1\)"),
        ("a: [1\nb: 2\n", r"line \d+, column \d+: YAML syntax error"),
        ("- a\n- b\n", "must be a YAML mapping .* got list"),
    ],
)
def test_a_bad_recipe_file_names_its_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_recipe_yaml(_write(tmp_path, text))


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="Expected a recipe path after `--config`"):
        parse_command(["--max_steps", "1", "--config"])
    with pytest.raises(ValueError, match="does not exist .* check the path given to --config"):
        load_recipe_yaml(str(tmp_path / "none.yaml"))
    assert load_recipe_yaml(_write(tmp_path, RECIPE))["use_cpu"] is True


def test_config_equals_form_is_split():
    assert _split_config_flag(["--config=r.yaml", "--x", "1"]) == ["--config", "r.yaml", "--x", "1"]


def test_flags_override_the_recipe_and_launch_options_are_split_off(tmp_path):
    recipe = _write(tmp_path, RECIPE + "max_steps: 7\nnum_machines: 1\n")
    argv = ["--config", recipe, "--max_steps", "2", "--num_processes", "2", "--output_dir", str(tmp_path / "o")]
    (script, config, model), launch, launch_cli = parse_command(argv)
    assert config.max_steps == 2 and script.dataset_name == "builtin:reversal"
    assert model.model_name_or_path == "builtin:tiny" and config.trm_mode  # TRMConfig parsed
    assert launch == ["--num_machines", "1", "--num_processes", "2"] and launch_cli == ["--num_processes", "2"]
    with pytest.raises(ValueError, match=r"does not launch processes: `accelerate launch` options \["):
        parse_recipe(argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--learning_rte", "1"], r"Unknown command-line flags \['--learning_rte'\]"),
        (["stray"], r"Unexpected positional arguments \['stray'\]"),
        (["--num_processes"], "Expected a value after `--num_processes`"),
    ],
)
def test_unknown_flags_and_stray_arguments_are_named(tmp_path, extra, message):
    argv = ["--config", _write(tmp_path, RECIPE), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=message):
        parse_command(argv + extra)


def test_unknown_recipe_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown recipe keys \['trm_mod'\]"):
        parse_recipe(["--config", _write(tmp_path, RECIPE + "trm_mod: token\n")])
