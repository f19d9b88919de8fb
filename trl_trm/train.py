"""`trl-trm train`: `trl grpo` (trl/scripts/grpo.py) with `TRMTrainer`, from a YAML recipe and/or flags.

A recipe is one YAML mapping read by TRL's `TrlParser` into three dataclasses: :class:`TrainScriptArguments` (TRL's
`GRPOScriptArguments` and `DatasetMixtureConfig`, plus a few keys of our own, below), [`TRMConfig`] (every
`GRPOConfig`/`TrainingArguments` field plus `trm_*`) and TRL's `ModelConfig` (`model_name_or_path`, `dtype`,
`use_peft`, `lora_*`, `load_in_4bit`). Command-line flags override recipe values; a run can also be given by flags
alone. A recipe written for `trl grpo` runs here with only `trm_*` keys added.

Everything that can be checked without the model is checked first (YAML syntax and duplicate keys, unknown keys,
trackers, reward functions, quantization, the output directory, dataset, prompt column, dataset size), so a bad
recipe fails in seconds with one message naming the input and the fix, before any model loads.

As in `trl grpo`, `--accelerate_config NAME_OR_PATH` (a TRL config name such as `zero3`, or a file) and any
`accelerate launch` option (`--num_processes 2`, ...) relaunch the command under `accelerate launch`.

Built-in sources, for offline use: `model_name_or_path: builtin:tiny` (a ~100k-parameter Qwen2 model and byte-level
tokenizer built locally, seeded by `seed`) and the tasks of `trl_trm/tasks.py` (`dataset_name: builtin:reversal`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import DatasetMixtureConfig
from trl.scripts.grpo import GRPOScriptArguments

from .tasks import BUILTIN_PREFIX, load_builtin_dataset

BUILTIN_MODELS = ("tiny",)
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TINY_MARKER = "trl_trm_tiny.json"  # written beside a built `builtin:tiny` model: the seed it was built with
JSONL_SCAN_BYTES = 64 * 2**20  # local .jsonl files up to this size are checked line by line before loading
LAUNCHED_ENV = "TRL_TRM_LAUNCHED"  # set by `trl-trm train` for the processes it starts under `accelerate launch`
# Files of an earlier run in output_dir that a new run must not silently mix with (checkpoints are `checkpoint-*`).
RUN_FILES = ("trm_stats.jsonl", "trainer_state.json", "model.safetensors", "adapter_model.safetensors")


class TrainingError(RuntimeError):
    """The run started but cannot give a result (e.g. it trained 0 steps): `trl-trm` exits with code 1."""


@dataclass
class TrainScriptArguments(GRPOScriptArguments, DatasetMixtureConfig):
    """Data and reward settings of `trl-trm train`: exactly `trl grpo`'s (TRL's `GRPOScriptArguments`: `dataset_name`,
    `dataset_config`, splits, `dataset_streaming`, `reward_funcs`, `reward_model_name_or_path`; and its
    `DatasetMixtureConfig`: `datasets`, `streaming`, `test_split_size`), plus the fields below.

    `dataset_name` also takes a local .json/.jsonl/.parquet/.csv file, a saved dataset directory or a built-in task
    (`builtin:reversal`); `reward_funcs` also takes this package's built-in rewards (`trl_trm/rewards.py`).

    Args:
        prompt_column: column holding the prompts; renamed to `prompt` for the trainer.
        chat_prompt: wrap string prompts as a user message, so the tokenizer's chat template is applied.
        system_prompt: system message prepended to every prompt (implies `chat_prompt`).
        max_train_samples: use only the first N training rows.
        overwrite_output_dir: start a fresh run in an `output_dir` that holds an earlier one, deleting its
            `checkpoint-*` folders and `trm_stats.*` first (transformers 5 has no such field; this is ours).
    """

    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompts; renamed to `prompt` for the trainer."}
    )
    chat_prompt: bool = field(
        default=False,
        metadata={"help": "Wrap string prompts as a user message, so the tokenizer's chat template is applied."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended to every prompt (implies `chat_prompt`)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows (quick runs)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh run in an output_dir that holds an earlier run (deletes its checkpoint-* folders "
            "and trm_stats.*). Without it such an output_dir is refused unless the run resumes."
        },
    )

    def __post_init__(self):
        DatasetMixtureConfig.__post_init__(self)  # `datasets` entries from YAML -> DatasetConfig


def make_parser(prog: str = "trl-trm train"):
    from trl import ModelConfig, TrlParser

    from .config import TRMConfig

    # allow_abbrev=False: argparse would otherwise accept `--trm_mod` as `--trm_mode`, hiding typos.
    return TrlParser(dataclass_types=[TrainScriptArguments, TRMConfig, ModelConfig], prog=prog, allow_abbrev=False)


# ------------------------------------------------------------------------------------------------ recipe file checks
def load_recipe_yaml(path: str) -> dict[str, Any]:
    """Read a recipe strictly: a missing file, a YAML syntax error (with its line) and a duplicate key (YAML would
    silently keep the last value) each raise one ValueError naming the file, the line and the fix."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first != line:
                raise ValueError(
                    f"recipe {path}, line {line}: duplicate key {key!r} (first set on line {first}); YAML would "
                    "silently keep the last value. Keep one of them."
                )
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} does not exist (or is not a file): check the path given to --config.")
    with open(path, encoding="utf-8") as f:
        try:
            recipe = yaml.load(f, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"recipe {path}{where}: YAML syntax error ({problem}). Fix the YAML there (a recipe is one mapping "
                "`key: value` per line; quote values holding `: ` or `#`)."
            ) from None
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping (`key: value` lines), got {type(recipe).__name__}.")
    return recipe


def _split_config_flag(argv: list[str]) -> list[str]:
    """TrlParser reads `--config PATH` only; `--config=PATH` would be ignored silently."""
    out = []
    for arg in argv:
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


# ------------------------------------------------------------------------------------------------ parsing
def _launch_options() -> dict[str, Any]:
    """`accelerate launch`'s options: option string -> argparse action (what `trl grpo` forwards to it)."""
    from accelerate.commands.launch import launch_command_parser

    return {opt: action for action in launch_command_parser()._actions for opt in action.option_strings}


def _split_launch_args(from_config: list[str], from_cli: list[str]) -> tuple[list[str], list[str], list[str], list]:
    """Split what TrlParser did not consume into `accelerate launch` arguments, the CLI tokens they came from (to
    remove them from the command the launched processes run), unknown keys/flags and positional leftovers."""
    options = _launch_options()
    options["--accelerate_config"] = None  # TRL's own flag, resolved to `--config_file`
    launch, launch_cli, unknown, positional = [], [], [], []
    # Recipe keys come as ["--key", "value"] pairs.
    for flag, value in zip(from_config[::2], from_config[1::2], strict=False):
        if flag not in options:
            unknown.append(flag.lstrip("-"))
            continue
        action = options[flag]
        if action is not None and action.nargs == 0:  # a switch (`cpu: true`): the flag alone, when true
            if str(value).lower() in ("true", "1", "yes"):
                launch.append(flag)
        else:
            launch += [flag, str(value)]
    i = 0
    while i < len(from_cli):
        token = from_cli[i]
        if not token.startswith("-"):
            positional.append(token)
            i += 1
            continue
        flag, has_value, value = token.partition("=")
        if flag not in options:
            unknown.append(token)
            i += 1
            continue
        action = options[flag]
        if has_value or (action is not None and action.nargs == 0):
            launch.append(token)
            launch_cli.append(token)
            i += 1
        else:
            value = from_cli[i + 1] if i + 1 < len(from_cli) else None
            if value is None or value.startswith("--"):
                raise ValueError(f"Expected a value after `{flag}`.")
            launch += [flag, value]
            launch_cli += [flag, value]
            i += 2
    return launch, launch_cli, unknown, positional


def parse_command(argv: list[str], prog: str = "trl-trm train"):
    """Parse `[--config recipe.yaml] [--field value ...]` -> ((script_args, trm_config, model_args), launch_args,
    launch_cli_tokens). `launch_args` are the `accelerate launch` options given (empty when none).

    Raises:
        ValueError: naming unknown recipe keys or flags, positional arguments, or a bad recipe file.
    """
    argv = _split_config_flag(list(argv))
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("Expected a recipe path after `--config`.")
        load_recipe_yaml(argv[index + 1])
    parser = make_parser(prog)
    *parsed, from_config, from_cli = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch, launch_cli, unknown, rest = _split_launch_args(from_config, from_cli)
    unknown_flags = [a for a in unknown if a.startswith("-")]  # from the command line
    unknown_keys = [a for a in unknown if not a.startswith("-")]  # from the recipe
    if unknown_keys or unknown_flags:
        where = []
        if unknown_keys:
            where.append(f"recipe keys {unknown_keys}")
        if unknown_flags:
            where.append(f"command-line flags {unknown_flags}")
        raise ValueError(
            f"Unknown {' and '.join(where)}. Every key must be a field of TrainScriptArguments (data, rewards), "
            "TRMConfig (GRPOConfig/TrainingArguments + trm_*), TRL's ModelConfig (model, LoRA, quantization) or an "
            f"`accelerate launch` option: check the spelling; `{prog} --help` lists them."
        )
    if rest:
        raise ValueError(f"Unexpected positional arguments {rest}: pass values as `--field value`.")
    return tuple(parsed), launch, launch_cli


def parse_recipe(argv: list[str], prog: str = "trl-trm train"):
    """`[--config recipe.yaml] [--field value ...]` -> (script_args, trm_config, model_args).

    Unknown recipe keys or flags raise a ValueError that names them (TrlParser collects them; we report them);
    `accelerate launch` options are refused here (only `trl-trm train` launches)."""
    parsed, launch, _ = parse_command(argv, prog)
    if launch:
        raise ValueError(f"{prog} does not launch processes: `accelerate launch` options {launch} are not accepted.")
    return parsed


# ------------------------------------------------------------------------------------------------ launching
def launch_with_accelerate(launch_args: list[str], script_argv: list[str], config) -> int:
    """Rerun `trl-trm train SCRIPT_ARGV` under `accelerate launch LAUNCH_ARGS`, as `trl grpo` does
    (`--accelerate_config` resolved with TRL's helper: a file, or a config name shipped with TRL). Returns the exit
    code of the launched run."""
    import argparse
    import subprocess

    from accelerate.commands import launch as accelerate_launch
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    if os.environ.get("LOCAL_RANK") is not None or os.environ.get("WORLD_SIZE") is not None:
        raise ValueError(
            f"`accelerate launch` options {launch_args} were given to a process that is already launched (LOCAL_RANK/"
            "WORLD_SIZE is set): pass them to your launcher, not to `trl-trm train`."
        )
    launch_args = resolve_accelerate_config_argument(launch_args)
    num = _launch_value(launch_args, "--num_processes", "--num-processes")
    if num is None and "--config_file" in launch_args:
        num = _config_num_processes(launch_args[launch_args.index("--config_file") + 1])
    if num is not None and int(num) > 1 and (config.use_cpu or "--cpu" in launch_args or not _has_accelerator()):
        raise ValueError(
            f"`--num_processes {num}` on CPU: accelerate's multi-CPU launcher needs `mpirun` and otherwise starts one "
            "process. Start several CPU processes with `torchrun --nproc_per_node N -m trl_trm.cli train ...` "
            "instead (gloo backend), or run on GPUs."
        )
    parser = accelerate_launch.launch_command_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args([*launch_args, "--module", "trl_trm.cli", "train", *script_argv])
    except argparse.ArgumentError as err:
        raise ValueError(f"Bad `accelerate launch` option: {err}.") from None
    os.environ[LAUNCHED_ENV] = "1"  # the launched processes ignore launch keys that the recipe holds
    try:
        accelerate_launch.launch_command(args)
    except subprocess.CalledProcessError as err:
        raise TrainingError(
            f"the run launched with `accelerate launch {' '.join(launch_args)}` exited with code {err.returncode} "
            "(its output is above)."
        ) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0


def _launch_value(args: list[str], *names: str) -> str | None:
    for i, token in enumerate(args):
        flag, has_value, value = token.partition("=")
        if flag in names:
            return value if has_value else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _config_num_processes(path: str) -> int | None:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("num_processes")
    except (OSError, yaml.YAMLError):
        return None  # accelerate reports a bad config file itself
    return int(value) if isinstance(value, int) else None


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


# ------------------------------------------------------------------------------------------------ start-up checks
# report_to name -> (importable modules, pip package).
TRACKERS = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "mlflow": (("mlflow",), "mlflow"),
    "swanlab": (("swanlab",), "swanlab"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "neptune": (("neptune",), "neptune"),
}


def check_report_to(config) -> None:
    """Every tracker in `report_to` must be known and installed (transformers would fail after the model loads)."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    report_to = config.report_to
    if report_to in (None, "none", "all"):
        return
    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name == "none":
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(
                f"`report_to: {name}` is not a tracker transformers knows: use one of {', '.join(INTEGRATION_TO_CALLBACK)}"
                ", or `none`."
            )
        modules, pip_name = TRACKERS.get(name, ((), name))
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ValueError(
                f"`report_to: {name}` but {pip_name} is not installed: `pip install {pip_name}`, or remove {name} "
                "from `report_to` (`report_to: none` logs to the console and trm_stats.jsonl only)."
            )


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_hub_model(name: str, what: str, revision: str | None = None) -> None:
    """A model that is not a local directory: a path that does not exist is named as such; a Hub id under
    HF_HUB_OFFLINE=1 must be in the local cache."""
    if os.path.isdir(name):
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a path; Hub ids are `org/name`
        raise ValueError(f"`{what}` {name!r} is not a directory: give a saved model directory or a Hub model id.")
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision if revision not in (None, "main") else None)
    if not isinstance(cached, str):
        raise ValueError(
            f"`{what}` {name!r} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it: unset HF_HUB_OFFLINE to download it, fetch it first where there is network "
            f"(`hf download {name}`), or give a local model directory."
        )


def check_quantization(model_args):
    """TRL's `get_quantization_config` (QLoRA: `load_in_4bit`, `load_in_8bit`); refused by name when it cannot work."""
    import importlib.util

    from trl import get_quantization_config

    quantization_config = get_quantization_config(model_args)
    if quantization_config is None:
        return None
    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"`{flag}: true` quantizes the model with bitsandbytes, which is not installed: `pip install bitsandbytes` "
            f"(it needs a supported accelerator), or remove `{flag}`."
        )
    if not model_args.use_peft:
        raise ValueError(
            f"`{flag}: true` without `use_peft: true`: a quantized model cannot be fully fine-tuned. Set `use_peft: "
            "true` (QLoRA), or remove the quantization."
        )
    return quantization_config


def checkpoint_problem(path: str, need_adaptive: bool = False) -> str | None:
    """Why the checkpoint folder `path` is incomplete (None when complete). transformers writes `trainer_state.json`
    last; TRMTrainer writes `trm_adaptive_state.json` after it."""
    from .adaptive import STATE_FILE_NAME

    files = ["trainer_state.json"]
    if need_adaptive or os.path.exists(os.path.join(path, STATE_FILE_NAME)):
        files.append(STATE_FILE_NAME)
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"it has no {name}"
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"its {name} is cut short"
    return None


def resolve_checkpoint(value, output_dir: str, need_adaptive: bool = False):
    """`resume_from_checkpoint: true` / `last` -> the last complete checkpoint in output_dir (the YAML/CLI value is a
    string); incomplete ones (a crash or a full disk while saving) are skipped with a warning."""
    if value is None or str(value).lower() in ("false", "no", "none", ""):
        return None
    if str(value).lower() in ("true", "yes", "last"):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        checkpoints = []
        if os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                step = name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
                if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
                    if os.path.isdir(os.path.join(output_dir, name)):
                        checkpoints.append((int(step), os.path.join(output_dir, name)))
        if not checkpoints:
            raise ValueError(
                f"`resume_from_checkpoint: {value}` but {output_dir!r} holds no checkpoint-* folder: remove the key "
                "to start fresh, or give a checkpoint path."
            )
        for _, path in sorted(checkpoints, reverse=True):
            problem = checkpoint_problem(path, need_adaptive)
            if problem is None:
                return path
            warnings.warn(
                f"Skipping the incomplete checkpoint {path} ({problem}: a crash or a full disk while saving); "
                "resuming from the newest complete one.",
                RuntimeWarning,
                stacklevel=2,
            )
        raise ValueError(
            f"`resume_from_checkpoint: {value}` but every checkpoint-* folder in {output_dir!r} is incomplete: start "
            "fresh (`--overwrite_output_dir true`) or give a checkpoint path."
        )
    if not os.path.isdir(value):
        raise ValueError(f"`resume_from_checkpoint` {value!r} is not a directory: give a checkpoint-* folder.")
    problem = checkpoint_problem(value, need_adaptive)
    if problem is not None:
        raise ValueError(
            f"`resume_from_checkpoint` {value!r} is incomplete ({problem}): resume from an earlier checkpoint-* "
            "folder (`resume_from_checkpoint: true` picks the newest complete one)."
        )
    return value


def earlier_run_files(output_dir: str) -> list[str]:
    """The files and `checkpoint-*` folders of an earlier run in output_dir."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-"))
    return found + [n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))]


def check_output_dir(script_args: TrainScriptArguments, config) -> None:
    """A fresh run in an output_dir that holds an earlier one is refused, unless `overwrite_output_dir` is set: then
    the old checkpoints (which a later `resume_from_checkpoint: true` would pick up) and trm_stats.* go first."""
    if config.resume_from_checkpoint is not None:
        return
    found = earlier_run_files(config.output_dir)
    if not found:
        return
    if not script_args.overwrite_output_dir:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"output_dir {config.output_dir!r} already holds a run ({shown}). To continue it: "
            "`--resume_from_checkpoint true`; to start over there: `--overwrite_output_dir true` (deletes its "
            "checkpoint-* folders and trm_stats.*); or choose another output_dir."
        )
    from accelerate import PartialState

    if PartialState().is_main_process:
        from .plotting import PLOT_FILE, STATS_FILE

        for name in found:
            path = os.path.join(config.output_dir, name)
            if name.startswith("checkpoint-"):
                shutil.rmtree(path)
        for name in (STATS_FILE, PLOT_FILE):
            if os.path.exists(os.path.join(config.output_dir, name)):
                os.remove(os.path.join(config.output_dir, name))
    PartialState().wait_for_everyone()


# ------------------------------------------------------------------------------------------------ data
def _jsonl_problem(path: str) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object, as 'line N: ...' (None when all are)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: {err.msg} (column {err.colno})"
            if not isinstance(row, dict):
                return f"line {number}: a {type(row).__name__}, not a JSON object"
    return None


def _check_local_file(path: str) -> None:
    if os.path.getsize(path) == 0 or not open(path, encoding="utf-8", errors="replace").read(4096).strip():
        raise ValueError(f"Dataset file {path!r} is empty: give a file with one JSON object (row) per line.")


def _load_file(path: str, split: str, streaming: bool):
    from datasets import load_dataset

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOCAL_FORMATS:
        raise ValueError(
            f"Dataset file {path!r} has an unsupported extension {suffix!r}: use one of {', '.join(LOCAL_FORMATS)}."
        )
    if split != "train":  # a single file is one split: do not silently evaluate on the training data
        raise ValueError(
            f"{path!r} is a single file, so it has no {split!r} split: evaluate on a separate dataset (a `datasets` "
            "mixture with `test_split_size`) or set `eval_strategy: no`."
        )
    if LOCAL_FORMATS[suffix] == "json":
        _check_local_file(path)
        if suffix == ".jsonl" and os.path.getsize(path) <= JSONL_SCAN_BYTES:  # name the bad line before loading
            problem = _jsonl_problem(path)
            if problem:
                raise ValueError(
                    f"Cannot read dataset file {path!r}: {problem}. Fix the file (one JSON object per line)."
                )
    try:
        return load_dataset(LOCAL_FORMATS[suffix], data_files=path, split="train", streaming=streaming)
    except Exception as err:  # the datasets error does not say where: find the line
        problem = _jsonl_problem(path) if LOCAL_FORMATS[suffix] == "json" else None
        cause = problem or f"{type(err).__name__}: {_first_line(err)}"
        raise ValueError(
            f"Cannot read dataset file {path!r}: {cause}. Fix the file (one JSON object per line)."
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err) or repr(err)
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause):
        text = f"{text.splitlines()[0]} ({type(cause).__name__}: {str(cause).splitlines()[0]})"
    return text.splitlines()[0]


def _load_local(path: str, split: str, streaming: bool = False):
    from datasets import load_dataset, load_from_disk

    if not os.path.isdir(path):
        return _load_file(path, split, streaming)
    if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
        os.path.join(path, "dataset_dict.json")
    ):
        data = load_from_disk(path)
        if not hasattr(data, "keys"):  # a single saved Dataset has no splits
            if split != "train":
                raise ValueError(
                    f"{path!r} is a single saved Dataset (no splits), so it has no {split!r} split: evaluate on a "
                    "separate dataset or set `eval_strategy: no`."
                )
        else:
            if split not in data:
                raise ValueError(f"{path!r} has no split {split!r}; its splits are {list(data)}.")
            data = data[split]
        return data.to_iterable_dataset() if streaming else data
    return load_dataset(path, split=split, streaming=streaming)


def _load_mixture(args: TrainScriptArguments, split: str, seed: int):
    """TRL's `get_dataset` over the `datasets` mixture (its splits: `train`, and `test` with `test_split_size`).

    `get_dataset` splits with `train_test_split` and no seed, which draws one from numpy's global state: it is seeded
    with `seed` here, so the train and test calls (and every process) get the same split, disjoint."""
    import numpy as np
    from trl import get_dataset

    for entry in args.datasets:
        files = entry.data_files if isinstance(entry.data_files, list) else [entry.data_files]
        for file in files:
            if isinstance(file, str) and os.path.isfile(file) and file.endswith((".jsonl", ".json")):
                _check_local_file(file)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        data = get_dataset(args)
    except ValueError:
        raise
    except Exception as err:
        local = [
            f for e in args.datasets for f in (e.data_files if isinstance(e.data_files, list) else [e.data_files])
        ]
        for file in local:
            if isinstance(file, str) and os.path.isfile(file) and file.endswith(".jsonl"):
                problem = _jsonl_problem(file)
                if problem:
                    raise ValueError(f"Cannot read dataset file {file!r}: {problem}. Fix the file.") from None
        hint = " The Hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)." if _offline_datasets() else ""
        raise ValueError(
            f"Cannot load the `datasets` mixture {[e.path for e in args.datasets]}: {type(err).__name__}: "
            f"{_first_line(err)}.{hint} Check each entry's path, name, data_files and split."
        ) from None
    finally:
        np.random.set_state(state)
    if split not in data:
        raise ValueError(
            f"The `datasets` mixture has the splits {list(data)}, not {split!r}: set `test_split_size` for a test "
            "split, or `dataset_train_split` / `dataset_test_split` to one of them."
        )
    return data[split]


def _offline_datasets() -> bool:
    return _offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")


def load_prompts(args: TrainScriptArguments, seed: int = 0, split: str | None = None):
    """Load a split and return it with a `prompt` column (checked), in the format the recipe asks for.

    Args:
        args: the data settings.
        seed: seed of a built-in task's data.
        split: the split (default `args.dataset_train_split`).

    Returns:
        A `Dataset`, or an `IterableDataset` with `dataset_streaming` / `streaming`.
    """
    split = split or args.dataset_train_split
    name = args.dataset_name
    streaming = args.dataset_streaming or args.streaming
    if args.datasets and name:
        raise ValueError(
            "Both `datasets` (a mixture) and `dataset_name` are set: keep one (`trl grpo` would ignore "
            f"dataset_name {name!r})."
        )
    local = bool(name) and (name.startswith(BUILTIN_PREFIX) or os.path.exists(name))
    if args.dataset_config is not None and (args.datasets or local):
        raise ValueError(
            f"`dataset_config: {args.dataset_config}` applies to a Hub dataset in `dataset_name` only; here it would be "
            "ignored: remove it (a mixture entry takes its own `name`)."
        )
    if args.datasets:
        data = _load_mixture(args, split, seed)
        name = "+".join(e.path for e in args.datasets)
    elif not name:
        raise ValueError(
            "No dataset: set `dataset_name` (Hub name, local file, or builtin:reversal) or a `datasets` mixture."
        )
    elif name.startswith(BUILTIN_PREFIX):
        data = load_builtin_dataset(name, split, seed)
        data = data.to_iterable_dataset() if streaming else data
    elif os.path.exists(name):
        data = _load_local(name, split, streaming)
    else:
        from datasets import load_dataset

        try:
            data = load_dataset(name, name=args.dataset_config, split=split, streaming=streaming)
        except Exception as err:  # offline, missing repo, bad config: say which dataset and what to do
            hint = " The Hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)." if _offline_datasets() else ""
            raise ValueError(
                f"Cannot load dataset {name!r} (config {args.dataset_config!r}, split {split!r}): "
                f"{type(err).__name__}: {_first_line(err)}.{hint} Use a local .json/.jsonl/.parquet file or check the "
                "name, config and split."
            ) from None
    if data.column_names is None:  # a streamed dataset whose features are only known from its rows
        data = data._resolve_features()
    if args.prompt_column not in data.column_names:
        raise ValueError(
            f"Dataset {name!r} has no prompt column {args.prompt_column!r}; its columns are {data.column_names}. "
            "Set `prompt_column` in the recipe to the column that holds the prompts."
        )
    if args.prompt_column != "prompt":
        if "prompt" in data.column_names:
            data = data.remove_columns("prompt")
        data = data.rename_column(args.prompt_column, "prompt")
    if args.max_train_samples is not None and split == args.dataset_train_split:
        if streaming:
            data = data.take(args.max_train_samples)
        else:
            data = data.select(range(min(args.max_train_samples, len(data))))
    if not streaming and len(data) == 0:
        raise ValueError(f"Dataset {name!r} (split {split!r}) has no rows: give a dataset with prompts.")
    if args.chat_prompt or args.system_prompt is not None:
        system = args.system_prompt

        def to_chat(row: dict[str, Any]) -> dict[str, Any]:
            prompt = row["prompt"]
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if system is not None and (not messages or messages[0].get("role") != "system"):
                messages = [{"role": "system", "content": system}, *messages]
            return {"prompt": messages}

        data = data.map(to_chat)
    return data


def check_dataset_size(train_dataset, config) -> None:
    """A dataset smaller than one generation batch's distinct prompts would train 0 steps (TRL's RepeatSampler
    drops incomplete batches): refuse it naming the numbers. A streamed dataset needs `max_steps`."""
    if not hasattr(train_dataset, "__len__"):
        if config.max_steps is None or config.max_steps <= 0:
            raise ValueError(
                "A streamed dataset (`dataset_streaming`/`streaming`) has no length, so the number of steps is "
                "unknown: set `max_steps`."
            )
        return
    prompts = config.generation_batch_size // config.num_generations
    if len(train_dataset) < prompts:
        raise ValueError(
            f"The training dataset has {len(train_dataset)} rows, but one generation batch takes {prompts} distinct "
            f"prompts (generation_batch_size {config.generation_batch_size} / num_generations "
            f"{config.num_generations}), so training would run 0 steps: use a larger dataset, or a smaller "
            "per_device_train_batch_size / steps_per_generation."
        )


# Keyword arguments TRL passes to every reward function besides the dataset columns (grpo_trainer `_calculate_rewards`).
TRL_REWARD_KWARGS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}


def check_reward_columns(reward_funcs, columns: list[str]) -> None:
    """Each reward function's required named parameters must be provided by TRL or be dataset columns."""
    import inspect

    for func in reward_funcs:
        if not callable(func) or isinstance(func, str):
            continue
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
        missing = [name for name in required if name not in TRL_REWARD_KWARGS and name not in columns]
        if missing:
            name = getattr(func, "__name__", repr(func))
            raise ValueError(
                f"Reward function {name!r} needs the dataset column(s) {missing}, but the dataset has {columns}. "
                "Use a dataset with those columns or another reward function."
            )


def check_trl_rewards(names: list[str], train_dataset, config) -> None:
    """TRL's named rewards that would fail or do nothing mid-training are refused at start-up."""
    from .rewards import CONVERSATIONAL_REWARDS, SOFT_OVERLONG_CACHE, SOFT_OVERLONG_MAX_LEN

    first = next(iter(train_dataset))["prompt"]
    for name in names:
        if name in CONVERSATIONAL_REWARDS and not isinstance(first, list):
            raise ValueError(
                f"Reward function {name!r} (trl.rewards) reads conversational completions, but the prompts are "
                "strings: set `chat_prompt: true` (or use a dataset of message lists)."
            )
        if name == "get_soft_overlong_punishment" and config.max_completion_length <= (
            SOFT_OVERLONG_MAX_LEN - SOFT_OVERLONG_CACHE
        ):
            raise ValueError(
                f"`get_soft_overlong_punishment` uses max_completion_len={SOFT_OVERLONG_MAX_LEN}, "
                f"soft_punish_cache={SOFT_OVERLONG_CACHE} (as in `trl grpo`), so with max_completion_length="
                f"{config.max_completion_length} it never penalises: raise max_completion_length above "
                f"{SOFT_OVERLONG_MAX_LEN - SOFT_OVERLONG_CACHE}, or use your own `trl.rewards.get_soft_overlong_"
                "punishment(...)` via a `module:function` reward."
            )


# ------------------------------------------------------------------------------------------------ model
def main_process_first():
    """Run the block on the (local) main process first, then on the others (no-op in a single process)."""
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def resolve_model(model_args, output_dir: str, seed: int) -> str:
    """The model to load: a built-in one is built into `output_dir/_init-model` (rebuilt when it was built with
    another seed); a Hub id is checked against offline mode."""
    name = model_args.model_name_or_path
    if not name:
        raise ValueError(
            "No model: set `model_name_or_path` in the recipe (Hub id, local directory, or builtin:tiny)."
        )
    if name.startswith(BUILTIN_PREFIX):
        which = name[len(BUILTIN_PREFIX) :]
        if which not in BUILTIN_MODELS:
            raise ValueError(
                f"Unknown built-in model {name!r}: available: builtin:{', builtin:'.join(BUILTIN_MODELS)}."
            )
        from .tiny import save_tiny_model

        path = os.path.join(output_dir, "_init-model")  # `_*` is not uploaded by push_to_hub
        marker = os.path.join(path, TINY_MARKER)
        with main_process_first():  # one writer; the other ranks load what it wrote
            built = None
            if os.path.exists(marker):
                with open(marker, encoding="utf-8") as f:
                    built = json.load(f).get("seed")
            if built != seed:  # missing, or built with another seed: the seed must take effect
                save_tiny_model(path, seed=seed)
                with open(marker, "w", encoding="utf-8") as f:
                    json.dump({"seed": seed}, f)
        return path
    check_hub_model(name, "model_name_or_path", model_args.model_revision)
    return name


def build_trainer(script_args: TrainScriptArguments, config, model_args):
    """Checks the recipe (trackers, rewards, quantization, output_dir, data) and then builds the `TRMTrainer` (this
    is where the model loads)."""
    from trl import get_peft_config

    from .rewards import TRL_REWARD_NAMES, resolve_reward_funcs
    from .trainer import TRMTrainer

    if script_args.ignore_bias_buffers:
        raise ValueError(
            "`ignore_bias_buffers` is a DDP workaround of TRL's DPO scripts that GRPO does not use (`trl grpo` ignores "
            "it too): remove it."
        )
    check_report_to(config)
    reward_funcs: list = []
    if script_args.reward_model_name_or_path:  # first, as in `trl grpo`; GRPOTrainer loads it
        check_hub_model(script_args.reward_model_name_or_path, "reward_model_name_or_path")
        reward_funcs.append(script_args.reward_model_name_or_path)
    if script_args.reward_funcs or not reward_funcs:
        reward_funcs += resolve_reward_funcs(script_args.reward_funcs)
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"`reward_weights` has {len(config.reward_weights)} entries but there are {len(reward_funcs)} reward "
            "functions (`reward_model_name_or_path` counts as the first): give one weight per reward function."
        )
    if config.push_to_hub and os.environ.get("HF_HUB_OFFLINE") == "1":  # every rank stops, before the model loads
        from .hub import offline_push_error

        raise offline_push_error(config.hub_model_id)
    quantization_config = check_quantization(model_args)
    config.resume_from_checkpoint = resolve_checkpoint(
        config.resume_from_checkpoint, config.output_dir, need_adaptive=config.trm_target_accept_rate is not None
    )
    with main_process_first():  # the main process fills the datasets cache, the others read it
        train_dataset = load_prompts(script_args, seed=config.seed)
        eval_dataset = None
        if config.eval_strategy != "no":
            eval_dataset = load_prompts(script_args, seed=config.seed, split=script_args.dataset_test_split)
    check_dataset_size(train_dataset, config)
    columns = train_dataset.column_names or list(next(iter(train_dataset)))  # a mapped stream may not know them
    check_reward_columns(reward_funcs, columns)
    check_trl_rewards([n for n in script_args.reward_funcs or [] if n in TRL_REWARD_NAMES], train_dataset, config)
    check_output_dir(script_args, config)
    model = resolve_model(model_args, config.output_dir, config.seed)
    # As `trl grpo`: the model's init kwargs from ModelConfig, then the recipe's own `model_init_kwargs` on top.
    init_kwargs: dict[str, Any] = {}
    if model_args.dtype is not None:
        init_kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation is not None:
        init_kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_revision not in (None, "main"):
        init_kwargs["revision"] = model_args.model_revision
    if config.trust_remote_code:
        init_kwargs["trust_remote_code"] = True
    init_kwargs.update(config.model_init_kwargs or {})
    config.model_init_kwargs = init_kwargs or None
    return TRMTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )


def check_trained(trainer) -> None:
    """A run that trained 0 steps is an error (it would otherwise save the untrained model and exit 0)."""
    if trainer.state.global_step == 0:
        raise TrainingError(
            f"training ran 0 steps (max_steps {trainer.args.max_steps}, num_train_epochs "
            f"{trainer.args.num_train_epochs}): the dataset gave no complete batch. Nothing was saved; use more rows "
            "or set max_steps."
        )


def run_train(script_args: TrainScriptArguments, config, model_args):
    """Train, save, optionally push; returns the trainer (its `state.log_history` holds the metrics)."""
    trainer = build_trainer(script_args, config, model_args)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    check_trained(trainer)
    if not config.push_to_hub:  # push_to_hub saves the model itself (one full gather under ZeRO-3/FSDP, not two)
        trainer.save_model(config.output_dir)
    dataset_name = script_args.dataset_name
    if dataset_name and (dataset_name.startswith(BUILTIN_PREFIX) or os.path.exists(dataset_name)):
        dataset_name = None  # not a Hub dataset: the card does not link it
    if config.push_to_hub:  # saves the model, writes the card (TRMTrainer.create_model_card) and uploads
        trainer.push_to_hub(dataset_name=dataset_name)
    elif trainer.accelerator.is_main_process:
        trainer.create_model_card(
            model_name=os.path.basename(os.path.normpath(config.output_dir)), dataset_name=dataset_name
        )
    return trainer
