"""Loading the prompts of a run: a Hub dataset, a local .json/.jsonl/.parquet/.csv file or saved dataset directory, a
`datasets` mixture (TRL's `get_dataset`), or a built-in task of `trl_trm/tasks.py` (`builtin:reversal`).

:func:`load_prompts` returns one split with a `prompt` column, checked (the prompt column exists, the split has rows)
and in the format the recipe asks for (`chat_prompt`, `system_prompt`, `max_train_samples`, streaming). A malformed
file or an unreachable dataset raises one `ValueError` line naming the file (and line) or the dataset and the fix.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from .preflight import TRUE_VALUES, _offline
from .tasks import BUILTIN_PREFIX, load_builtin_dataset

if TYPE_CHECKING:
    from .recipe import TrainScriptArguments

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
JSONL_SCAN_BYTES = 64 * 2**20  # local .jsonl files up to this size are checked line by line before loading


def _jsonl_problem(path: str) -> str | None:
    """The first line of a JSON-lines file that is not UTF-8 or not a JSON object, as 'line N: ...' (None when all
    are)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (
                    f"line {number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}; save the file "
                    "as UTF-8)"
                )
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
    return _offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in TRUE_VALUES


def _check_source(args: TrainScriptArguments) -> None:
    """Settings that name the data in two ways, or that would be ignored, are refused."""
    name = args.dataset_name
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


def _load_hub(args: TrainScriptArguments, split: str, streaming: bool):
    from datasets import load_dataset

    name = args.dataset_name
    try:
        return load_dataset(name, name=args.dataset_config, split=split, streaming=streaming)
    except Exception as err:  # offline, missing repo, bad config: say which dataset and what to do
        hint = " The Hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)." if _offline_datasets() else ""
        raise ValueError(
            f"Cannot load dataset {name!r} (config {args.dataset_config!r}, split {split!r}): "
            f"{type(err).__name__}: {_first_line(err)}.{hint} Use a local .json/.jsonl/.parquet file or check the "
            "name, config and split."
        ) from None


def _load_source(args: TrainScriptArguments, split: str, seed: int, streaming: bool):
    """The split from wherever the recipe names it -> (data, the name used in errors)."""
    name = args.dataset_name
    if args.datasets:
        return _load_mixture(args, split, seed), "+".join(e.path for e in args.datasets)
    if not name:
        raise ValueError(
            "No dataset: set `dataset_name` (Hub name, local file, or builtin:reversal) or a `datasets` mixture."
        )
    if name.startswith(BUILTIN_PREFIX):
        data = load_builtin_dataset(name, split, seed)
        return (data.to_iterable_dataset() if streaming else data), name
    if os.path.exists(name):
        return _load_local(name, split, streaming), name
    return _load_hub(args, split, streaming), name


def _with_prompt_column(data, args: TrainScriptArguments, name: str):
    """`args.prompt_column` renamed to `prompt` (an existing `prompt` column gives way); a missing one is refused."""
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
    return data


def _as_chat(data, system: str | None):
    """String prompts become a user message; `system` (when given) is prepended as a system message."""

    def to_chat(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": system}, *messages]
        return {"prompt": messages}

    return data.map(to_chat)


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
    streaming = args.dataset_streaming or args.streaming
    _check_source(args)
    data, name = _load_source(args, split, seed, streaming)
    data = _with_prompt_column(data, args, name)
    if args.max_train_samples is not None and split == args.dataset_train_split:
        if streaming:
            data = data.take(args.max_train_samples)
        else:
            data = data.select(range(min(args.max_train_samples, len(data))))
    if not streaming and len(data) == 0:
        raise ValueError(f"Dataset {name!r} (split {split!r}) has no rows: give a dataset with prompts.")
    if args.chat_prompt or args.system_prompt is not None:
        data = _as_chat(data, args.system_prompt)
    return data


def load_train_eval(args: TrainScriptArguments, config):
    """The training split, and the test split when `config.eval_strategy` evaluates (else None)."""
    train_dataset = load_prompts(args, seed=config.seed)
    eval_dataset = None
    if config.eval_strategy != "no":
        eval_dataset = load_prompts(args, seed=config.seed, split=args.dataset_test_split)
    return train_dataset, eval_dataset
