"""Parsing a `trl-trm train` command: the YAML recipe and the flags, into the three dataclasses of the run.

A recipe is one YAML mapping read by TRL's `TrlParser` into three dataclasses: :class:`TrainScriptArguments` (TRL's
`GRPOScriptArguments` and `DatasetMixtureConfig`, plus a few keys of our own), [`TRMConfig`] (every
`GRPOConfig`/`TrainingArguments` field plus `trm_*`) and TRL's `ModelConfig` (`model_name_or_path`, `dtype`,
`use_peft`, `lora_*`, `load_in_4bit`). Command-line flags override recipe values; a run can also be given by flags
alone. A recipe written for `trl grpo` runs here with only `trm_*` keys added.

The recipe file is read strictly first (a YAML syntax error or a duplicate key names its line); keys and flags that
no dataclass takes are refused by name, except `accelerate launch` options, which :func:`parse_command` returns for
`trl_trm.launch` to relaunch the command with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trl import DatasetMixtureConfig
from trl.scripts.grpo import GRPOScriptArguments


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
        allow_trm_change: resume a checkpoint with other TRM settings (refused without it); both segments are
            recorded in `trm_segments.json` and the model card.
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

    allow_trm_change: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint with other TRM settings (trm_mode, trm_delta_*, the geo band, the ratio "
            "bounds, the adaptive controller). Without it such a resume is refused; with it both segments are "
            "recorded in output_dir/trm_segments.json and the model card."
        },
    )

    def __post_init__(self):
        if isinstance(self.reward_funcs, str):  # `reward_funcs: reversal` in YAML: one name, not its letters
            self.reward_funcs = [self.reward_funcs]
        try:
            DatasetMixtureConfig.__post_init__(self)  # `datasets` entries from YAML -> DatasetConfig
        except TypeError as err:  # an entry with a key DatasetConfig does not take (a typo)
            from dataclasses import fields

            from trl.scripts.utils import DatasetConfig

            keys = ", ".join(f.name for f in fields(DatasetConfig))
            raise ValueError(
                f"A `datasets` entry has a key that dataset entries do not take ({err}): the keys are {keys}."
            ) from None


# `ddp_timeout` of the command line (seconds): a stalled or stopped process fails the run after 10 minutes, not after
# transformers' 30. The recipe or `--ddp_timeout` override it; `TRMConfig` itself keeps transformers' default.
CLI_DDP_TIMEOUT = 600


def make_parser(prog: str = "trl-trm train"):
    from trl import ModelConfig, TrlParser

    from .config import TRMConfig

    # allow_abbrev=False: argparse would otherwise accept `--trm_mod` as `--trm_mode`, hiding typos.
    parser = TrlParser(dataclass_types=[TrainScriptArguments, TRMConfig, ModelConfig], prog=prog, allow_abbrev=False)
    parser.set_defaults(ddp_timeout=CLI_DDP_TIMEOUT)  # a recipe's value (set_defaults too) and flags come later
    return parser


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
