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


# ---------------------------------------------------------------------- checkpointing, saving and evaluation keys
def _parse(recipe):
    return parse_recipe(["--config", str(recipe), "--use_cpu", "true"])


def _raw(recipe) -> dict:
    return yaml.safe_load(Path(recipe).read_text())


GSM8K_RECIPES = [p for p in TRAIN_RECIPES if _raw(p).get("dataset_name") == "openai/gsm8k"]


def test_recipe_groups_are_not_empty():
    assert len(GSM8K_RECIPES) >= 3


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipe_parses_without_a_deprecation_warning(recipe):
    import warnings

    raw = _raw(recipe)
    assert "gradient_checkpointing" not in raw and isinstance(raw["activation_checkpointing"], bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # above pytest's `ignore::FutureWarning`
        _, config, _ = _parse(recipe)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, deprecations
    # trl reads the deprecated name: it mirrors the current one.
    assert config.activation_checkpointing is raw["activation_checkpointing"] is config.gradient_checkpointing


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipes_that_save_keep_a_bounded_number_of_checkpoints(recipe):
    _, config, _ = _parse(recipe)
    if config.save_strategy != "no":
        assert config.save_total_limit is not None and 1 <= config.save_total_limit <= 3, config.save_total_limit


@pytest.mark.parametrize("recipe", GSM8K_RECIPES, ids=lambda p: p.name)
def test_gsm8k_recipes_evaluate_on_the_held_out_split(recipe):
    script, config, _ = _parse(recipe)
    assert config.eval_strategy == "steps" and config.eval_steps
    assert script.dataset_test_split == "test" and script.dataset_train_split == "train"
    if config.save_strategy == "steps":  # an eval at every save: the saved checkpoints have an eval_reward
        assert config.save_steps % config.eval_steps == 0
    group = config.num_generations_eval or config.num_generations
    for world in (1, 2, 4, 7, 8):  # TRL requires whole groups in the global eval batch too
        assert config.per_device_eval_batch_size * world % group == 0, world


# ------------------------------------------------------------- the keys take effect in TRMTrainer (tiny model)
@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_takes_effect(make_trainer, on):
    trainer = make_trainer(activation_checkpointing=on, max_steps=1)
    assert trainer.args.gradient_checkpointing is on  # what trl reads
    trainer.train()
    assert trainer.model.is_activation_checkpointing is on


def test_save_total_limit_takes_effect(make_trainer, tmp_path):
    out = tmp_path / "ckpt"
    trainer = make_trainer(output_dir=out, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


def test_an_eval_split_is_evaluated_with_its_own_group_size(tiny_model_dir, toy_dataset, tmp_path):
    from trainer_kwargs import base_config_kwargs, length_reward

    from trl_trm import TRMConfig, TRMTrainer

    # An eval batch of 2 holds whole groups only with num_generations_eval=2 (training's num_generations is 4).
    kwargs = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2, max_steps=1)
    args = TRMConfig(**base_config_kwargs(tmp_path / "out", num_generations_eval=2, **kwargs))
    with pytest.raises(ValueError, match="eval batch size"):
        TRMConfig(**base_config_kwargs(tmp_path / "out", **kwargs))
    eval_rows = toy_dataset.select(range(6))
    trainer = TRMTrainer(
        model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=toy_dataset, eval_dataset=eval_rows
    )
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_reward"] <= 1.0, metrics
    assert "eval_trm/accept_rate" in metrics, sorted(metrics)


@pytest.mark.slow
def test_the_demo_prints_no_deprecation_warning(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trl_trm.cli", "demo", "--output_dir", str(out), "--max_steps", "5"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    for category in ("FutureWarning", "DeprecationWarning"):
        assert category not in log, log[-3000:]
    assert (out / "trm_stats.png").stat().st_size > 0
