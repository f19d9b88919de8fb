"""`trl-trm train` mirrors `trl grpo`, and every silent misconfiguration or traceback of issue 12 is one clear line.

Each test runs `main([...])` in-process and checks the exit code and the one `error:` line (no traceback), or, for
the settings that must take effect, what reaches `TRMTrainer` (a stand-in class records its arguments, so no model
is trained unless the test is about training).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml
from trainer_kwargs import MISSING_MODEL, one_error_line, write_recipe

from trl_trm.cli import main


def _recipe(tmp_path: Path, text: str | None = None, **overrides) -> Path:
    return write_recipe(tmp_path / "r.yaml", text, **overrides)


def _error(capsys) -> str:
    return one_error_line(capsys)


class RecordingTrainer:
    """Stands in for TRMTrainer in `build_trainer`: records the keyword arguments it was given."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        RecordingTrainer.calls.append(kwargs)


@pytest.fixture
def recording_trainer(monkeypatch):
    import trl_trm.trainer

    RecordingTrainer.calls = []
    monkeypatch.setattr(trl_trm.trainer, "TRMTrainer", RecordingTrainer)
    return RecordingTrainer.calls


def _build(argv):
    from trl_trm.train import build_trainer, parse_recipe

    return build_trainer(*parse_recipe(argv))


# ------------------------------------------------------------------------------------------------ recipe files
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    recipe = _recipe(tmp_path, text="model_name_or_path: builtin:tiny\nlearning_rate: [1e-3\nmax_steps: 2\n")
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert f"recipe {recipe}, line 3" in line and "YAML syntax error" in line


def test_duplicate_recipe_key_is_refused_naming_it(tmp_path, capsys):
    text = yaml.safe_dump({"model_name_or_path": MISSING_MODEL, "dataset_name": "builtin:reversal"})
    recipe = _recipe(tmp_path, text=text + "learning_rate: 1.0e-3\nlearning_rate: 1.0e-5\n")
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert "duplicate key 'learning_rate' (first set on line 3)" in line and "line 4" in line


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in _error(capsys)


# ------------------------------------------------------------------------------------------------ data
def test_malformed_jsonl_names_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "target": "a"}\n{"prompt": "b", "target": \n{"prompt": "c", "target": "c"}\n')
    assert main(["train", "--config", str(_recipe(tmp_path, dataset_name=str(data)))]) == 2
    line = _error(capsys)
    assert f"Cannot read dataset file {str(data)!r}: line 2:" in line and MISSING_MODEL not in line


def test_empty_jsonl_is_refused(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n")
    assert main(["train", "--config", str(_recipe(tmp_path, dataset_name=str(data)))]) == 2
    assert f"Dataset file {str(data)!r} is empty" in _error(capsys)


def test_too_small_dataset_is_refused_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "reverse: ab", "target": "ba"}) + "\n")  # 1 row, 2 prompts per batch
    recipe = _recipe(tmp_path, dataset_name=str(data), per_device_train_batch_size=4, num_generations=2)
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert "has 1 rows, but one generation batch takes 2 distinct prompts" in line and "0 steps" in line


def test_a_run_that_trained_zero_steps_is_an_error():
    from types import SimpleNamespace

    from trl_trm.train import TrainingError, check_trained

    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=0), args=SimpleNamespace(max_steps=-1, num_train_epochs=1)
    )
    with pytest.raises(TrainingError, match="training ran 0 steps"):
        check_trained(trainer)
    trainer.state.global_step = 3
    check_trained(trainer)  # a run that trained passes


def test_zero_step_error_exits_1_without_traceback(tmp_path, capsys, monkeypatch):
    import trl_trm.train as train

    def no_steps(*args, **kwargs):
        raise train.TrainingError("training ran 0 steps (test)")

    monkeypatch.setattr(train, "run_train", no_steps)
    assert main(["train", "--config", str(_recipe(tmp_path))]) == 1
    assert "training ran 0 steps" in _error(capsys)


def test_dataset_config_that_would_be_ignored_is_refused(tmp_path, capsys):
    assert main(["train", "--config", str(_recipe(tmp_path, dataset_config="main"))]) == 2  # builtin:reversal
    assert "`dataset_config: main` applies to a Hub dataset in `dataset_name` only" in _error(capsys)


def test_dataset_streaming_gives_an_iterable_dataset_and_needs_max_steps(tmp_path, capsys):
    from datasets import IterableDataset

    from trl_trm.train import TrainScriptArguments, load_prompts

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"p{i}", "target": "x"}) + "\n" for i in range(6)))
    stream = load_prompts(TrainScriptArguments(dataset_name=str(data), dataset_streaming=True, prompt_column="q"))
    assert isinstance(stream, IterableDataset) and [r["prompt"] for r in stream] == [f"p{i}" for i in range(6)]
    recipe = _recipe(tmp_path, dataset_name=str(data), prompt_column="q", dataset_streaming=True, max_steps=-1)
    assert main(["train", "--config", str(recipe)]) == 2
    assert "A streamed dataset" in _error(capsys)


# ------------------------------------------------------------------------------------------------ trackers, Hub
@pytest.mark.parametrize(
    ("tracker", "pip_name"), [("wandb", "wandb"), ("tensorboard", "tensorboard"), ("trackio", "trackio")]
)
def test_missing_tracker_names_the_pip_install(tmp_path, capsys, monkeypatch, tracker, pip_name):
    import importlib.util

    real = importlib.util.find_spec
    hidden = {"wandb", "tensorboard", "tensorboardX", "trackio"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    assert main(["train", "--config", str(_recipe(tmp_path, report_to=[tracker]))]) == 2
    line = _error(capsys)
    assert f"`report_to: {tracker}` but {pip_name} is not installed: `pip install {pip_name}`" in line


def test_hub_model_id_while_offline_names_the_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--config", str(_recipe(tmp_path, model_name_or_path="nobody/no-such-model-xyz"))]) == 2
    line = _error(capsys)
    assert "'nobody/no-such-model-xyz' is not a local directory and not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line


def test_reward_model_is_checked_offline_and_passed_first(
    tmp_path, capsys, monkeypatch, tiny_model_dir, recording_trainer
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = _recipe(tmp_path, model_name_or_path=tiny_model_dir, reward_model_name_or_path="nobody/rm-xyz")
    assert main(["train", "--config", str(recipe)]) == 2
    assert "`reward_model_name_or_path` 'nobody/rm-xyz' is not a local directory" in _error(capsys)
    _build(["--config", str(recipe), "--reward_model_name_or_path", tiny_model_dir])
    funcs = recording_trainer[0]["reward_funcs"]
    assert funcs[0] == tiny_model_dir and funcs[1].__name__ == "reversal"  # as `trl grpo`: the model first


# ------------------------------------------------------------------------------------------------ resume, output_dir
def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # an empty, complete safetensors file
    state = json.dumps({"global_step": step})
    (path / "trainer_state.json").write_text(state if complete else state[:5])  # cut short by a full disk
    return path


def test_reused_output_dir_without_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    _checkpoint(out, 3)
    (out / "trm_stats.jsonl").write_text('{"step": 1}\n')
    recipe = _recipe(tmp_path, model_name_or_path="builtin:tiny")
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert f"output_dir {str(out)!r} already holds a run (checkpoint-3, trm_stats.jsonl)" in line
    assert "--resume_from_checkpoint true" in line and "--overwrite_output_dir true" in line
    assert (out / "trm_stats.jsonl").read_text() == '{"step": 1}\n'  # untouched
    assert not (out / "_init-model").exists()  # refused before the model is built


def test_overwrite_output_dir_removes_old_checkpoints_and_stats(tmp_path, tiny_model_dir, recording_trainer):
    out = tmp_path / "out"
    _checkpoint(out, 3)
    (out / "trm_stats.jsonl").write_text('{"step": 1}\n')
    _build(["--config", str(_recipe(tmp_path, model_name_or_path=tiny_model_dir)), "--overwrite_output_dir", "true"])
    assert recording_trainer and not (out / "checkpoint-3").exists() and not (out / "trm_stats.jsonl").exists()


def test_stats_callback_moves_an_earlier_runs_file_aside(tmp_path):
    from types import SimpleNamespace

    from trl_trm.callbacks import TRMStatsCallback

    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "trm_stats.jsonl").write_text('{"step": 5}\n')
    (tmp_path / "trm_stats.1.jsonl").write_text('{"step": 9}\n')
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0, is_world_process_zero=True)
    with pytest.warns(
        RuntimeWarning, match=r"moved to trm_stats.2.jsonl; it also holds the checkpoints \['checkpoint-5'\]"
    ):
        TRMStatsCallback().on_train_begin(args, state, None)
    assert (tmp_path / "trm_stats.2.jsonl").read_text() == '{"step": 5}\n'  # not truncated
    assert not (tmp_path / "trm_stats.jsonl").exists()


def test_builtin_tiny_is_rebuilt_for_another_seed(tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from trl_trm.train import TINY_MARKER, resolve_model

    model_args = SimpleNamespace(model_name_or_path="builtin:tiny", model_revision="main")
    path = resolve_model(model_args, str(tmp_path), seed=0)
    first = load_file(f"{path}/model.safetensors")
    assert resolve_model(model_args, str(tmp_path), seed=0) == path
    assert resolve_model(model_args, str(tmp_path), seed=1) == path
    second = load_file(f"{path}/model.safetensors")
    assert json.loads((Path(path) / TINY_MARKER).read_text()) == {"seed": 1}
    assert any((first[k] != second[k]).any() for k in first)  # the new seed took effect


# ------------------------------------------------------------------------------------------------ quantization
def test_load_in_4bit_without_bitsandbytes_is_refused_by_name(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: the refusal does not apply")
    recipe = _recipe(tmp_path, load_in_4bit=True, use_peft=True)
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert "`load_in_4bit: true` quantizes the model with bitsandbytes, which is not installed" in line
    assert "pip install bitsandbytes" in line and MISSING_MODEL not in line


def test_load_in_4bit_passes_the_quantization_config(tmp_path, monkeypatch, tiny_model_dir, recording_trainer):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )
    recipe = _recipe(tmp_path, model_name_or_path=tiny_model_dir, load_in_4bit=True)
    with pytest.raises(ValueError, match="without `use_peft: true`"):
        _build(["--config", str(recipe)])
    _build(["--config", str(recipe), "--use_peft", "true", "--bnb_4bit_quant_type", "fp4"])
    quantization = recording_trainer[0]["quantization_config"]
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "fp4"
    assert recording_trainer[0]["peft_config"] is not None


# ------------------------------------------------------------------------------------------------ TRL's rewards
def test_trl_reward_names_resolve_and_are_checked(tmp_path, capsys):
    import trl.rewards

    from trl_trm.rewards import resolve_reward_funcs

    assert resolve_reward_funcs(["think_format_reward"]) == [trl.rewards.think_format_reward]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(8)))
    recipe = _recipe(tmp_path, dataset_name=str(data), reward_funcs=["think_format_reward"])
    assert main(["train", "--config", str(recipe)]) == 2
    assert "'think_format_reward' (trl.rewards) reads conversational completions" in _error(capsys)
    recipe = _recipe(tmp_path, reward_funcs=["get_soft_overlong_punishment"], max_completion_length=256)
    assert main(["train", "--config", str(recipe)]) == 2
    assert "it never penalises" in _error(capsys)


def test_accuracy_reward_without_math_verify_is_refused(monkeypatch):
    import trl.import_utils as trl_import_utils

    from trl_trm.rewards import resolve_reward_funcs

    monkeypatch.setattr(trl_import_utils, "is_math_verify_available", lambda: False)
    with pytest.raises(ValueError, match="needs the `math_verify` package.*pip install math-verify"):
        resolve_reward_funcs(["accuracy_reward"])


# ------------------------------------------------------------------------------------------------ launching
def test_accelerate_config_and_num_processes_relaunch_like_trl(tmp_path, monkeypatch, capsys):
    from accelerate.commands import launch as accelerate_launch

    import trl_trm.launch as launch

    launched = []
    monkeypatch.setattr(accelerate_launch, "launch_command", launched.append)
    monkeypatch.setattr(launch, "_has_accelerator", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = _recipe(tmp_path, use_cpu=False, bf16=False)
    argv = ["train", "--config", str(recipe), "--accelerate_config", "zero3", "--num_processes", "2"]
    assert main([*argv, "--max_steps", "2"]) == 0
    (args,) = launched
    assert Path(args.config_file).name == "zero3.yaml" and "trl" in Path(args.config_file).parts  # TRL's config
    assert args.num_processes == 2 and args.module and args.training_script == "trl_trm.cli"
    assert args.training_script_args == ["train", "--config", str(recipe), "--max_steps", "2"]
    # A CPU run cannot start several processes this way: refused, naming torchrun.
    assert main(["train", "--config", str(_recipe(tmp_path)), "--num_processes", "2"]) == 2
    assert "torchrun --nproc_per_node" in _error(capsys)
    # An unknown flag is still refused by name (not forwarded to accelerate).
    assert main(["train", "--config", str(recipe), "--num_proceses", "2"]) == 2
    assert "Unknown command-line flags ['--num_proceses']" in _error(capsys)


# ------------------------------------------------------------------------------------------------ help, version, API
def test_help_lists_one_line_per_command_and_version(capsys):
    from importlib.metadata import version

    from trl_trm.cli import COMMANDS

    for argv in ([], ["--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        for name in COMMANDS:
            assert sum(line.strip().startswith(name + " ") for line in out.splitlines()) == 1, (name, out)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"trl-trm {version('trl-trm')}"


def test_trmtrainer_has_grpotrainers_signature():
    from trl import GRPOTrainer

    from trl_trm import TRMTrainer

    ours = inspect.signature(TRMTrainer.__init__).parameters
    trl = inspect.signature(GRPOTrainer.__init__).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items()] == [(n, p.kind, p.default) for n, p in trl.items()]
    assert ours["reward_funcs"].default is None


def test_trmtrainer_without_reward_funcs(tiny_model_dir, toy_dataset, tmp_path):
    """As GRPOTrainer: `reward_funcs` may be left out (for an environment that owns the rewards); without any reward
    source TRL's own check answers (not a TypeError about a missing argument)."""
    from trainer_kwargs import base_config_kwargs

    from trl_trm import TRMConfig, TRMTrainer

    with pytest.raises(ValueError, match="No reward source provided"):
        TRMTrainer(tiny_model_dir, args=TRMConfig(**base_config_kwargs(tmp_path)), train_dataset=toy_dataset)


# ------------------------------------------------------------------------------------------------ a `trl grpo` recipe
TRL_GRPO_RECIPE = """\
# A recipe in the shape of TRL's `trl grpo --config grpo_config.yaml` examples, local model and data.
model_name_or_path: {model}
dtype: float32
datasets:
  - path: json
    data_files: {data}
    split: train
reward_funcs:
  - think_format_reward
  - trl_recipe_rewards.short_answer
learning_rate: 1.0e-2
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 8
max_steps: 2
logging_steps: 1
output_dir: {out}
report_to: none
use_cpu: true
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: [q_proj, v_proj]
"""


def test_a_trl_grpo_recipe_runs_with_only_trm_keys_added(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from trl.scripts.grpo import make_parser as trl_grpo_parser

    (tmp_path / "trl_recipe_rewards.py").write_text(
        "def short_answer(completions, **kw):\n    return [1.0 / (1 + len(c[0]['content'])) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"reverse: {w}"}]} for w in ["ab", "cde", "fg", "hij"] * 2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    trl_recipe = TRL_GRPO_RECIPE.format(model=tiny_model_dir, data=data, out=out)
    (tmp_path / "trl.yaml").write_text(trl_recipe)
    # The recipe is valid for `trl grpo` itself (its parser, every key used) ...
    *_, from_config, from_cli = trl_grpo_parser().parse_args_and_config(
        ["--config", str(tmp_path / "trl.yaml")], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert from_config == [] and from_cli == []
    # ... and runs under `trl-trm train` with only trm_* keys added.
    (tmp_path / "trm.yaml").write_text(trl_recipe + "trm_mode: trm\ntrm_delta_max: 0.5\n")
    assert main(["train", "--config", str(tmp_path / "trm.yaml")]) == 0
    assert (out / "adapter_model.safetensors").exists()
    records = [json.loads(line) for line in (out / "trm_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("trm/accept_rate" in r for r in records)
    assert "| `trm_delta_max` | 0.5 |" in (out / "README.md").read_text()


def test_flags_only_run_without_a_recipe(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "flags"
    argv = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", "builtin:reversal"]
    argv += ["--reward_funcs", "reversal", "--output_dir", str(out), "--use_cpu", "true", "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4"]
    argv += ["--report_to", "none", "--save_strategy", "no", "--max_train_samples", "8"]
    assert main(argv) == 0
    assert (out / "model.safetensors").exists() and (out / "trm_stats.jsonl").exists()
    # Flags only, without rewards or a dataset: each missing input is named, before the model loads.
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--use_cpu", "true"]) == 2
    assert "No reward function given" in _error(capsys)
    assert (
        main(["train", "--model_name_or_path", tiny_model_dir, "--use_cpu", "true", "--reward_funcs", "reversal"]) == 2
    )
    assert "No dataset" in _error(capsys)


@pytest.mark.slow
def test_num_processes_really_launches_under_accelerate(tmp_path, monkeypatch):
    """Not mocked: `--num_processes 1 --cpu` reruns the command through `accelerate launch` (a child process)."""
    from trl_trm.demo import demo_recipe_path

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "launched"
    argv = ["train", "--config", demo_recipe_path(), "--output_dir", str(out), "--max_steps", "2"]
    assert main([*argv, "--num_processes", "1", "--cpu"]) == 0
    records = [json.loads(line) for line in (out / "trm_stats.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 2 and (out / "model.safetensors").exists()
