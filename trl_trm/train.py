"""`trl-trm train`: run `TRMTrainer` from a YAML recipe.

A recipe is one YAML mapping read by TRL's `TrlParser` into three dataclasses: :class:`TrainScriptArguments` (data and
rewards, below), [`TRMConfig`] (every `GRPOConfig`/`TrainingArguments` field plus `trm_*`) and TRL's `ModelConfig`
(`model_name_or_path`, `dtype`, `use_peft`, `lora_*`). Command-line flags override recipe values. Everything that can
be checked without the model is checked first (unknown keys, reward functions, dataset and prompt column), so a bad
recipe fails in seconds with a message naming the key, before any model loads.

Built-in sources, for offline use: `model_name_or_path: builtin:tiny` (a ~100k-parameter Qwen2 model and byte-level
tokenizer built locally) and `dataset_name: builtin:reversal` (string reversal, exact reward `reversal`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny",)
BUILTIN_DATASETS = ("reversal",)
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TrainScriptArguments:
    """Data and reward settings of a `trl-trm train` recipe (the model is TRL's `ModelConfig`, training `TRMConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset: a Hub name (`openai/gsm8k`), a local .json/.jsonl/.parquet/.csv file, a local dataset "
            "directory, or `builtin:reversal`."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (e.g. `main`)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on (when eval_strategy != no)."}
    )
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
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: built-in names (`reversal`, `gsm8k_accuracy`, `hash_answer_format`) or import "
            "paths `package.module:function`. Weights: `reward_weights` (TRMConfig)."
        },
    )


def make_parser(prog: str = "trl-trm train"):
    from trl import ModelConfig, TrlParser

    from .config import TRMConfig

    # allow_abbrev=False: argparse would otherwise accept `--trm_mod` as `--trm_mode`, hiding typos.
    return TrlParser(dataclass_types=[TrainScriptArguments, TRMConfig, ModelConfig], prog=prog, allow_abbrev=False)


def parse_recipe(argv: list[str], prog: str = "trl-trm train"):
    """`--config recipe.yaml [--field value ...]` -> (script_args, trm_config, model_args).

    Unknown recipe keys or flags raise a ValueError that names them (TrlParser collects them; we report them)."""
    parser = make_parser(prog)
    *parsed, from_config, from_cli = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    unknown = [a.lstrip("-") for a in from_config if a.startswith("--")]
    unknown_flags = [a for a in from_cli if a.startswith("-")]
    if unknown or unknown_flags:
        where = []
        if unknown:
            where.append(f"recipe keys {unknown}")
        if unknown_flags:
            where.append(f"command-line flags {unknown_flags}")
        raise ValueError(
            f"Unknown {' and '.join(where)}. Every key must be a field of TrainScriptArguments (data, rewards), "
            "TRMConfig (GRPOConfig/TrainingArguments + trm_*) or TRL's ModelConfig (model, LoRA): check the spelling; "
            f"`{prog} --help` lists them."
        )
    if from_cli:
        raise ValueError(f"Unexpected positional arguments {from_cli}: pass values as `--field value`.")
    return tuple(parsed)


def _load_local(path: str, split: str):
    from datasets import load_dataset, load_from_disk

    if os.path.isdir(path):
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
                return data
            if split not in data:
                raise ValueError(f"{path!r} has no split {split!r}; its splits are {list(data)}.")
            return data[split]
        return load_dataset(path, split=split)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOCAL_FORMATS:
        raise ValueError(
            f"Dataset file {path!r} has an unsupported extension {suffix!r}: use one of {', '.join(LOCAL_FORMATS)}."
        )
    if split != "train":  # a single file is one split: do not silently evaluate on the training data
        raise ValueError(
            f"{path!r} is a single file, so it has no {split!r} split: evaluate on a separate dataset or set "
            "`eval_strategy: no`."
        )
    return load_dataset(LOCAL_FORMATS[suffix], data_files=path, split="train")


def load_prompts(args: TrainScriptArguments, seed: int = 0, split: str | None = None):
    """Load a split and return it with a `prompt` column (checked), in the format the recipe asks for."""
    from datasets import Dataset

    split = split or args.dataset_train_split
    name = args.dataset_name
    if not name:
        raise ValueError("No dataset: set `dataset_name` in the recipe (Hub name, local file, or builtin:reversal).")
    if name.startswith(BUILTIN_PREFIX):
        which = name[len(BUILTIN_PREFIX) :]
        if which not in BUILTIN_DATASETS:
            raise ValueError(
                f"Unknown built-in dataset {name!r}: available: builtin:{', builtin:'.join(BUILTIN_DATASETS)}."
            )
        from .demo import reversal_dataset

        data: Dataset = reversal_dataset(512 if split == "train" else 64, seed if split == "train" else seed + 1)
    elif os.path.exists(name):
        data = _load_local(name, split)
    else:
        from datasets import load_dataset

        try:
            data = load_dataset(name, name=args.dataset_config, split=split)
        except Exception as err:  # offline, missing repo, bad config: say which dataset and what to do
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = " The Hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)." if offline else ""
            raise ValueError(
                f"Cannot load dataset {name!r} (config {args.dataset_config!r}, split {split!r}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}.{hint} Use a local "
                ".json/.jsonl/.parquet file or check the name, config and split."
            ) from err
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
        data = data.select(range(min(args.max_train_samples, len(data))))
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


def main_process_first():
    """Run the block on the (local) main process first, then on the others (no-op in a single process)."""
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def resolve_model(model_args, output_dir: str, seed: int) -> str:
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
        with main_process_first():  # one writer; the other ranks load what it wrote
            if not os.path.exists(os.path.join(path, "config.json")):
                save_tiny_model(path, seed=seed)
        return path
    return name


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


def resolve_checkpoint(value, output_dir: str):
    """`resume_from_checkpoint: true` / `last` -> the last checkpoint in output_dir (the YAML/CLI value is a string)."""
    if value is None or str(value).lower() in ("false", "no", "none", ""):
        return None
    if str(value).lower() in ("true", "yes", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(
                f"`resume_from_checkpoint: {value}` but {output_dir!r} holds no checkpoint-* folder: remove the key "
                "to start fresh, or give a checkpoint path."
            )
        return last
    if not os.path.isdir(value):
        raise ValueError(f"`resume_from_checkpoint` {value!r} is not a directory: give a checkpoint-* folder.")
    return value


def build_trainer(script_args: TrainScriptArguments, config, model_args):
    """Checks the recipe (rewards, data) and then builds the `TRMTrainer` (this is where the model loads)."""
    from trl import get_peft_config

    from .rewards import resolve_reward_funcs
    from .trainer import TRMTrainer

    reward_funcs = resolve_reward_funcs(script_args.reward_funcs)
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"`reward_weights` has {len(config.reward_weights)} entries but `reward_funcs` has {len(reward_funcs)}: "
            "give one weight per reward function."
        )
    if config.push_to_hub and os.environ.get("HF_HUB_OFFLINE") == "1":  # every rank stops, before the model loads
        from .hub import offline_push_error

        raise offline_push_error(config.hub_model_id)
    with main_process_first():  # the main process fills the datasets cache, the others read it
        train_dataset = load_prompts(script_args, seed=config.seed)
        eval_dataset = None
        if config.eval_strategy != "no":
            eval_dataset = load_prompts(script_args, seed=config.seed, split=script_args.dataset_test_split)
    check_reward_columns(reward_funcs, train_dataset.column_names)
    config.resume_from_checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    model = resolve_model(model_args, config.output_dir, config.seed)
    init_kwargs = dict(config.model_init_kwargs or {})
    if model_args.dtype is not None:
        init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if model_args.model_revision not in (None, "main"):
        init_kwargs.setdefault("revision", model_args.model_revision)
    config.model_init_kwargs = init_kwargs or None
    return TRMTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )


def run_train(script_args: TrainScriptArguments, config, model_args):
    """Train, save, optionally push; returns the trainer (its `state.log_history` holds the metrics)."""
    trainer = build_trainer(script_args, config, model_args)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
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
