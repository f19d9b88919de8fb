"""Every shipped recipe parses with every key known (TrlParser over TrainScriptArguments, TRMConfig, ModelConfig),
and every Accelerate config loads with accelerate's own schema; the packaged demo recipe equals recipes/demo.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trl_trm.demo import demo_recipe_path
from trl_trm.rewards import BUILTIN_REWARDS
from trl_trm.train import parse_recipe

RECIPES = Path(__file__).parent.parent / "recipes"
TRAIN_RECIPES = sorted(RECIPES.glob("*.yaml"))
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in TRAIN_RECIPES}
    assert {"demo.yaml", "qwen2.5-0.5b-gsm8k-colocate.yaml", "qwen2.5-7b-server.yaml"} <= names
    assert {p.stem for p in ACCELERATE} >= {"single_gpu", "multi_gpu_ddp", "zero2", "zero3", "fsdp2"}


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_every_key_is_used(recipe):
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu is set:
    # the override changes only that check; every recipe key is still parsed and validated.
    script, config, model = parse_recipe(["--config", str(recipe), "--use_cpu", "true"])
    raw = yaml.safe_load(recipe.read_text())
    parsed = {**vars(script), **vars(model)}
    for key, value in raw.items():
        got = parsed[key] if key in parsed else getattr(config, key)
        if key == "output_dir" or isinstance(value, list) and key == "report_to":
            continue
        assert got == value or str(got) == str(value), (key, value, got)
    assert config.trm_mode != "none" and not config.vllm_importance_sampling_correction
    for name in script.reward_funcs:  # built-in names only: recipes must not depend on user modules
        assert name in BUILTIN_REWARDS
    if config.reward_weights is not None:
        assert len(config.reward_weights) == len(script.reward_funcs)
    # TRL requires the global generation batch to split into whole groups: check for the usual process counts.
    steps = config.steps_per_generation or config.gradient_accumulation_steps
    for world in (1, 2, 4, 7, 8):
        assert config.per_device_train_batch_size * world * steps % config.num_generations == 0, world
    # Each recipe documents its launch command.
    assert "trl-trm" in recipe.read_text() or "trl_trm.cli" in recipe.read_text()


def test_recipe_readme_has_a_launch_command_per_recipe():
    readme = (RECIPES / "README.md").read_text()
    for recipe in TRAIN_RECIPES:
        assert f"recipes/{recipe.name}" in readme, recipe.name


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    assert config.distributed_type in set(DistributedType)
    # `accelerate launch` turns nested deepspeed/fsdp keys into its own flags: each must be one.
    flags = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section, {}):
            assert key in flags, f"{path.name}: {section}.{key} is not an accelerate launch option"


def test_packaged_demo_recipe_equals_the_repository_copy():
    assert Path(demo_recipe_path()).read_text() == (RECIPES / "demo.yaml").read_text()
