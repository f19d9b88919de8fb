"""`trl-trm train` from a recipe: bad recipes fail before the model loads, with one clear line; a local-data recipe
with an imported reward trains, saves, writes trm_stats.jsonl, the plot and a model card with the TRM section."""

from __future__ import annotations

import json

import pytest
from trainer_kwargs import MISSING_MODEL, write_recipe

from trl_trm.cli import main


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rte": 1e-3}, "Unknown recipe keys ['learning_rte']"),
        ({"reward_funcs": ["no_such_mod:f"]}, "Cannot import the module of reward function 'no_such_mod:f'"),
        ({"reward_funcs": ["reversal"], "reward_weights": [1.0, 2.0]}, "`reward_weights` has 2 entries"),
        ({"prompt_column": "question"}, "has no prompt column 'question'"),
        ({"trm_delta_max": -1.0}, "trm_delta_max"),
        ({"dataset_name": "builtin:nope"}, "Unknown built-in dataset 'builtin:nope'"),
    ],
)
def test_bad_recipes_fail_before_the_model_loads(tmp_path, capsys, overrides, message):
    recipe = write_recipe(tmp_path / "r.yaml", **overrides)
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and MISSING_MODEL not in err


def test_unknown_flag_and_missing_config(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    assert main(["train", "--config", str(recipe), "--trm_mod", "trm"]) == 2
    assert "Unknown command-line flags ['--trm_mod']" in capsys.readouterr().err
    # No recipe is a flags-only run (as `trl grpo`): what is missing is named.
    assert main(["train", "--use_cpu", "true"]) == 2
    assert "No reward function given" in capsys.readouterr().err


def test_local_dataset_without_the_prompt_column_lists_columns(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(8)))
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(data))
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "has no prompt column 'prompt'" in err and "['question', 'answer']" in err


@pytest.mark.slow
def test_train_from_local_jsonl_with_imported_reward(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text(
        # + 0.1 * (i % 2): the tiny model's completions can all be alike, and a run whose rewards are constant within
        # every group has a zero gradient at every step, which `trl-trm train` reports as a failed run (exit 1).
        "def longer(completions, answer, **kw):\n"
        "    return [min(len(c), 20) / 20 + 0.1 * (i % 2) for i, c in enumerate(completions)]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "data.jsonl"
    words = ["abc", "ghij", "bad", "cafe", "jig", "hide", "face", "bead"]
    data.write_text("".join(json.dumps({"question": f"reverse: {w}", "answer": w[::-1]}) + "\n" for w in words * 2))
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model_name_or_path=tiny_model_dir,
        dataset_name=str(data),
        prompt_column="question",
        chat_prompt=True,
        reward_funcs=["my_rewards:longer"],
        output_dir=str(out),
        max_steps=2,
        logging_steps=1,
        bf16=True,  # training under bf16 autocast vs fp32 capture: a real mismatch
        trm_delta_max=1e-9,  # rejects everything: the low-accept warning must fire (patience 1)
        trm_accept_rate_patience=1,
    )
    with pytest.warns(RuntimeWarning, match="accept_rate has stayed below 0.5 for 1 logs"):
        assert main(["train", "--config", str(recipe)]) == 0
    assert (out / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "trm_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # Every rejection is delta_max's; a sequence computed bit-identically by both engines (log rho = 0 exactly) passes
    # any threshold, so "everything" is most of the batch, not all of it.
    assert all(r["trm/reject_rate/delta_max"] == pytest.approx(1.0 - r["trm/accept_rate"]) for r in records)
    assert sum(r["trm/accept_rate"] for r in records) / len(records) < 0.5
    assert (out / "trm_stats.png").stat().st_size > 10_000
    card = (out / "README.md").read_text()
    assert "## Trust Region Masking" in card and "| `trm_delta_max` | 1e-09 |" in card
    from trl_trm.hub import _fmt

    assert f"| `trm/accept_rate (last log)` | {_fmt(records[-1]['trm/accept_rate'])} |" in card
    assert "- trm" in card and "- grpo" in card  # TRL's card tags
    assert "Trust Region Masking for Long-Horizon LLM Reinforcement Learning" in card


def test_reward_columns_are_checked_before_the_model_loads(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", reward_funcs=["gsm8k_accuracy"])  # reversal data has no `answer`
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Reward function 'gsm8k_accuracy' needs the dataset column(s) ['answer']" in err
    assert MISSING_MODEL not in err


def test_resume_true_without_checkpoint_and_config_equals_form(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", resume_from_checkpoint="true")
    assert main(["train", f"--config={recipe}"]) == 2  # `--config=PATH` is read like `--config PATH`
    assert "holds no checkpoint-* folder" in capsys.readouterr().err


def test_eval_split_of_a_single_file_is_refused(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "target": "x"}) + "\n" for i in range(8)))
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(data), eval_strategy="steps", eval_steps=1)
    assert main(["train", "--config", str(recipe)]) == 2
    assert "is a single file, so it has no 'test' split" in capsys.readouterr().err


def test_every_name_of_the_runner_before_its_split_imports_from_trl_trm_train():
    """`trl_trm.train` was the whole runner; its names moved to recipe/launch/preflight/checkpoints/data and are
    re-exported, each the same object as in its new home."""
    import trl_trm.train as train
    from trl_trm import checkpoints, data, launch, preflight, recipe

    names = """BUILTIN_MODELS BUILTIN_PREFIX DatasetMixtureConfig GRPOScriptArguments JSONL_SCAN_BYTES LAUNCHED_ENV
    LOCAL_FORMATS RUN_FILES TINY_MARKER TRACKERS TRL_REWARD_KWARGS TrainScriptArguments TrainingError _check_local_file
    _config_num_processes _first_line _has_accelerator _jsonl_problem _launch_options _launch_value _load_file
    _load_local _load_mixture _offline _offline_datasets _split_config_flag _split_launch_args build_trainer
    check_dataset_size check_hub_model check_output_dir check_quantization check_report_to check_reward_columns
    check_trained check_trl_rewards checkpoint_problem earlier_run_files launch_with_accelerate load_builtin_dataset
    load_prompts load_recipe_yaml main_process_first make_parser parse_command parse_recipe resolve_checkpoint
    resolve_model run_train""".split()
    missing = [n for n in names if not hasattr(train, n)]
    assert not missing, missing
    for module in (checkpoints, data, launch, preflight, recipe):
        for name in names:
            if hasattr(module, name) and not name.startswith("__"):
                assert getattr(train, name) is getattr(module, name), (module.__name__, name)
