"""`trl-trm train`: `trl grpo` (trl/scripts/grpo.py) with `TRMTrainer`, from a YAML recipe and/or flags.

The runner is split by job; this module builds and runs the trainer, and the others are called in this order:

- `trl_trm/recipe.py`: the recipe and flags -> (:class:`TrainScriptArguments`, `TRMConfig`, TRL's `ModelConfig`);
- `trl_trm/launch.py`: `--accelerate_config` / `accelerate launch` options rerun the command under `accelerate launch`;
- `trl_trm/preflight.py` (and `trl_trm/checkpoints.py`): everything that can be checked without the model
  (trackers, reward functions, quantization, checkpoints, output directory, dataset size, reward columns), so a bad
  recipe fails in seconds with one message naming the input and the fix, before any model loads;
- `trl_trm/data.py`: the prompts (a Hub dataset, local files, a `datasets` mixture or a built-in task);
- here: the model (:func:`resolve_model`), :func:`build_trainer` and :func:`run_train` (train, save, card, push).

Built-in sources, for offline use: `model_name_or_path: builtin:tiny` (a ~100k-parameter Qwen2 model and byte-level
tokenizer built locally, seeded by `seed`) and the tasks of `trl_trm/tasks.py` (`dataset_name: builtin:reversal`).
Every name this module held before the split is still importable from it. `python -m trl_trm.train ARGS` is
`trl-trm train ARGS`.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Re-exported: `trl_trm.train` was the whole runner; its names keep their import path.
from .checkpoints import (  # noqa: F401
    RUN_FILES,
    check_output_dir,
    checkpoint_problem,
    earlier_run_files,
    resolve_checkpoint,
)
from .data import (  # noqa: F401
    JSONL_SCAN_BYTES,
    LOCAL_FORMATS,
    _check_local_file,
    _first_line,
    _jsonl_problem,
    _load_file,
    _load_local,
    _load_mixture,
    _offline_datasets,
    load_prompts,
    load_train_eval,
)
from .launch import (  # noqa: F401
    LAUNCHED_ENV,
    _config_num_processes,
    _has_accelerator,
    _launch_value,
    launch_with_accelerate,
)
from .preflight import (  # noqa: F401
    TRACKERS,
    TRL_REWARD_KWARGS,
    _offline,
    check_data,
    check_dataset_size,
    check_hub_model,
    check_quantization,
    check_recipe,
    check_report_to,
    check_reward_columns,
    check_trl_rewards,
)
from .recipe import (  # noqa: F401
    DatasetMixtureConfig,
    GRPOScriptArguments,
    TrainScriptArguments,
    _launch_options,
    _split_config_flag,
    _split_launch_args,
    load_recipe_yaml,
    make_parser,
    parse_command,
    parse_recipe,
)
from .run_health import TrainingError  # noqa: F401  (defined beside the trainer's checks; this import path stays)
from .tasks import BUILTIN_PREFIX, load_builtin_dataset  # noqa: F401

BUILTIN_MODELS = ("tiny",)
TINY_MARKER = "trl_trm_tiny.json"  # written beside a built `builtin:tiny` model: the seed it was built with


# ------------------------------------------------------------------------------------------------ model
def main_process_first():
    """Run the block on the (local) main process first, then on the others (no-op in a single process)."""
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def _build_tiny(path: str, seed: int) -> None:
    """Build `builtin:tiny` into `path` unless it is there already, built with `seed` (the seed must take effect)."""
    from .tiny import save_tiny_model

    marker = os.path.join(path, TINY_MARKER)
    with main_process_first():  # one writer; the other ranks load what it wrote
        built = None
        if os.path.exists(marker):
            with open(marker, encoding="utf-8") as f:
                built = json.load(f).get("seed")
        if built != seed:  # missing, or built with another seed
            save_tiny_model(path, seed=seed)
            with open(marker, "w", encoding="utf-8") as f:
                json.dump({"seed": seed}, f)


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
        path = os.path.join(output_dir, "_init-model")  # `_*` is not uploaded by push_to_hub
        _build_tiny(path, seed)
        return path
    check_hub_model(name, "model_name_or_path", model_args.model_revision)
    return name


def model_init_kwargs(model_args, config) -> dict[str, Any] | None:
    """As `trl grpo`: the model's init kwargs from ModelConfig, then the recipe's own `model_init_kwargs` on top."""
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
    return init_kwargs or None


def build_trainer(script_args: TrainScriptArguments, config, model_args):
    """Checks the recipe (`trl_trm.preflight`: trackers, rewards, quantization, output_dir, data) and then builds the
    `TRMTrainer` (this is where the model loads)."""
    from trl import get_peft_config

    from .trainer import TRMTrainer

    reward_funcs, quantization_config = check_recipe(script_args, config, model_args)
    with main_process_first():  # the main process fills the datasets cache, the others read it
        train_dataset, eval_dataset = load_train_eval(script_args, config)
    check_data(script_args, config, reward_funcs, train_dataset)
    model = resolve_model(model_args, config.output_dir, config.seed)
    config.model_init_kwargs = model_init_kwargs(model_args, config)
    trainer = TRMTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )
    check_prompt_lengths(trainer, train_dataset)
    return trainer


def model_context(model) -> int | None:
    """The model's context length (`max_position_embeddings` of its config, or of its text config), if it has one."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(trainer, train_dataset) -> None:
    """A prompt whose tokens plus `max_completion_length` exceed the model's context is refused with its row index
    (a model past its context would train silently on positions it never learned). Checked once the tokenizer and
    the model are loaded; streamed datasets and rows past `PROMPT_SCAN_ROWS` are not read."""
    from .preflight import PROMPT_SCAN_ROWS

    tokenizer, model = getattr(trainer, "processing_class", None), getattr(trainer, "model", None)
    context = model_context(model)
    if tokenizer is None or context is None or not hasattr(train_dataset, "__len__"):
        return
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    budget = trainer.args.max_completion_length
    prompts = train_dataset.select(range(min(len(train_dataset), PROMPT_SCAN_ROWS)))["prompt"]
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for index, length in enumerate(lengths):
        if length + budget > context:
            raise ValueError(
                f"Row {index} of the training data has a prompt of {length} tokens; with max_completion_length "
                f"{budget} that exceeds the model's context of {context} tokens: shorten or drop such prompts, or "
                "lower max_completion_length."
            )


def check_trained(trainer) -> None:
    """A run that trained 0 steps, or that could not learn (`TRMTrainer.trm_run_problem`: no finite reward, every
    sequence rejected, a zero gradient at every step), is an error: it would otherwise save the model and exit 0."""
    problem = getattr(trainer, "trm_run_problem", None)
    if problem is not None:
        raise TrainingError(f"{problem} The final model was not saved.")
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


def main(argv: list[str] | None = None) -> int:
    """`python -m trl_trm.train ARGS`: the same as `trl-trm train ARGS` (exit codes included)."""
    import sys

    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
