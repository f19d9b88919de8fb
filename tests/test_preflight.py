"""`trl_trm.preflight`: every start-up check refuses its bad value with its own one-line error (table-driven: one row
per refusal), and lets a good recipe through; the two stages run their checks in order."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from trl_trm import preflight


def _script(**fields):
    base = dict(reward_model_name_or_path=None, reward_funcs=["reversal"], ignore_bias_buffers=False)
    return SimpleNamespace(**{**base, **fields})


def _config(**fields):
    base = dict(
        report_to=[],
        reward_weights=None,
        push_to_hub=False,
        hub_model_id=None,
        max_steps=1,
        generation_batch_size=8,
        num_generations=4,
        max_completion_length=6,
    )
    return SimpleNamespace(**{**base, **fields})


def _quantized(**fields):
    from trl import ModelConfig

    return ModelConfig(model_name_or_path="m", load_in_4bit=True, **fields)


def _no_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )


def _bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )


def _reward_needs_answer(completions, answer, **kwargs):
    return [0.0] * len(completions)


# (id, set-up(monkeypatch) or None, the check called, a fragment of its one-line error)
REFUSALS = [
    (
        "ignore_bias_buffers",
        None,
        lambda: preflight.check_script_fields(_script(ignore_bias_buffers=True)),
        "`ignore_bias_buffers` is a DDP workaround",
    ),
    (
        "unknown tracker",
        None,
        lambda: preflight.check_report_to(_config(report_to=["nope"])),
        "`report_to: nope` is not a tracker transformers knows",
    ),
    (
        "tracker not installed",
        lambda mp: mp.setattr(importlib.util, "find_spec", lambda *a: None),
        lambda: preflight.check_report_to(_config(report_to="wandb")),
        "wandb is not installed: `pip install wandb`",
    ),
    (
        "model path missing",
        None,
        lambda: preflight.check_hub_model("./no/such/dir", "model_name_or_path"),
        "`model_name_or_path` './no/such/dir' is not a directory",
    ),
    (
        "hub id offline",
        lambda mp: mp.setenv("HF_HUB_OFFLINE", "1"),
        lambda: preflight.check_hub_model("nobody/not-cached-model", "model_name_or_path"),
        "not in the Hugging Face cache, and HF_HUB_OFFLINE=1",
    ),
    (
        "hub id offline (transformers)",
        lambda mp: mp.setenv("TRANSFORMERS_OFFLINE", "yes"),
        lambda: preflight.check_hub_model("nobody/not-cached-model", "reward_model_name_or_path"),
        "`reward_model_name_or_path` 'nobody/not-cached-model' is not a local directory",
    ),
    (
        "reward weights",
        None,
        lambda: preflight.check_rewards(_script(), _config(reward_weights=[1.0, 2.0])),
        "`reward_weights` has 2 entries but there are 1 reward functions",
    ),
    (
        "unknown reward",
        None,
        lambda: preflight.check_rewards(_script(reward_funcs=["no_such_mod:f"]), _config()),
        "Cannot import the module of reward function 'no_such_mod:f'",
    ),
    (
        "push offline",
        lambda mp: mp.setenv("HF_HUB_OFFLINE", "1"),
        lambda: preflight.check_push_offline(_config(push_to_hub=True, hub_model_id="me/run")),
        "HF_HUB_OFFLINE",
    ),
    (
        "4-bit without bitsandbytes",
        _no_bitsandbytes,
        lambda: preflight.check_quantization(_quantized(use_peft=True)),
        "`load_in_4bit: true` quantizes the model with bitsandbytes, which is not installed",
    ),
    (
        "4-bit without LoRA",
        _bitsandbytes,
        lambda: preflight.check_quantization(_quantized()),
        "`load_in_4bit: true` without `use_peft: true`",
    ),
    (
        "too few rows",
        None,
        lambda: preflight.check_dataset_size([{"prompt": "a"}], _config()),
        "The training dataset has 1 rows, but one generation batch takes 2 distinct prompts",
    ),
    (
        "stream without max_steps",
        None,
        lambda: preflight.check_dataset_size(iter([]), _config(max_steps=-1)),
        "A streamed dataset",
    ),
    (
        "reward column",
        None,
        lambda: preflight.check_reward_columns([_reward_needs_answer], ["prompt"]),
        "Reward function '_reward_needs_answer' needs the dataset column(s) ['answer']",
    ),
    (
        "conversational TRL reward",
        None,
        lambda: preflight.check_trl_rewards(["think_format_reward"], [{"prompt": "p"}], _config()),
        "'think_format_reward' (trl.rewards) reads conversational completions",
    ),
    (
        "soft overlong punishment",
        None,
        lambda: preflight.check_trl_rewards(["get_soft_overlong_punishment"], [{"prompt": "p"}], _config()),
        "it never penalises",
    ),
]


@pytest.mark.parametrize(("setup", "check", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_each_check_refuses_its_bad_value_with_one_line(monkeypatch, setup, check, message):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if setup is not None:
        setup(monkeypatch)
    from trl_trm.hub import HubPublishError

    with pytest.raises((ValueError, HubPublishError)) as err:  # both: one `error:` line and exit code 2
        check()
    line = str(err.value)
    assert message in line and "\n" not in line


def test_good_values_pass(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    preflight.check_script_fields(_script())
    for report_to in (None, "none", "all", [], ["none"]):
        preflight.check_report_to(_config(report_to=report_to))
    preflight.check_hub_model(str(tmp_path), "model_name_or_path")  # a local directory
    preflight.check_hub_model("org/model", "model_name_or_path")  # a Hub id, online
    assert [f.__name__ for f in preflight.check_rewards(_script(), _config(reward_weights=[1.0]))] == ["reversal"]
    preflight.check_push_offline(_config(push_to_hub=True))
    from trl import ModelConfig

    assert preflight.check_quantization(ModelConfig(model_name_or_path="m")) is None
    preflight.check_dataset_size([{"prompt": "a"}, {"prompt": "b"}], _config())
    preflight.check_reward_columns([_reward_needs_answer, "org/reward-model"], ["prompt", "answer"])
    preflight.check_trl_rewards(["think_format_reward"], [{"prompt": [{"role": "user", "content": "p"}]}], _config())


def test_every_tracker_row_names_a_transformers_integration():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(preflight.TRACKERS) <= set(INTEGRATION_TO_CALLBACK)


def test_every_refused_script_field_exists_in_the_script_arguments():
    from trl_trm.recipe import TrainScriptArguments

    fields = TrainScriptArguments.__dataclass_fields__
    for name, error in preflight.REFUSED_SCRIPT_FIELDS.items():
        assert name in fields and f"`{name}`" in error


def test_reward_model_comes_first_and_is_checked(tmp_path):
    funcs = preflight.check_rewards(_script(reward_model_name_or_path=str(tmp_path)), _config(reward_weights=[1, 1]))
    assert funcs[0] == str(tmp_path) and funcs[1].__name__ == "reversal"
    assert preflight.check_rewards(_script(reward_model_name_or_path=str(tmp_path), reward_funcs=None), _config()) == [
        str(tmp_path)
    ]


def test_check_recipe_runs_its_checks_in_order_and_resolves_the_checkpoint(tmp_path):
    from trl import ModelConfig

    model_args = ModelConfig(model_name_or_path="m")
    config = _config(report_to=["nope"], output_dir=str(tmp_path), resume_from_checkpoint="false")
    config.trm_target_accept_rate = None
    with pytest.raises(ValueError, match="ignore_bias_buffers"):  # the first of two problems
        preflight.check_recipe(_script(ignore_bias_buffers=True), config, model_args)
    config.report_to = []
    funcs, quantization = preflight.check_recipe(_script(), config, model_args)
    assert [f.__name__ for f in funcs] == ["reversal"] and quantization is None
    assert config.resume_from_checkpoint is None  # "false" -> None


def test_check_data_checks_size_then_columns_then_output_dir(tmp_path):
    (tmp_path / "trm_stats.jsonl").write_text("{}\n")
    config = _config(output_dir=str(tmp_path), resume_from_checkpoint=None)
    script = _script(reward_funcs=None, overwrite_output_dir=False)
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match="has 1 rows"):
        preflight.check_data(script, config, [_reward_needs_answer], rows.select([0]))
    with pytest.raises(ValueError, match=r"needs the dataset column\(s\) \['answer'\]"):
        preflight.check_data(script, config, [_reward_needs_answer], rows)
    with pytest.raises(ValueError, match="already holds a run"):
        preflight.check_data(script, config, [], rows)
