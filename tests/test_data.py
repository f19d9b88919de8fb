"""`trl_trm.data`: the prompts of a run from a local file, a saved dataset, a `datasets` mixture or a built-in task,
with a checked `prompt` column in the format the recipe asks for; a bad file or source is one line naming it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trl_trm.data import load_prompts, load_train_eval
from trl_trm.recipe import TrainScriptArguments


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dataset_mixture_with_local_files_and_test_split(tmp_path):
    from trl_trm.data import load_prompts
    from trl_trm.recipe import TrainScriptArguments

    for name in ("a", "b"):
        rows = [{"question": f"{name}{i}", "other": 1} for i in range(10)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = TrainScriptArguments(
        datasets=[
            {"path": "json", "data_files": str(tmp_path / "a.jsonl"), "columns": ["question"]},
            {"path": "json", "data_files": str(tmp_path / "b.jsonl"), "columns": ["question"]},
        ],
        test_split_size=0.25,
        prompt_column="question",
    )
    train, test = load_prompts(args), load_prompts(args, split="test")
    assert len(train) == 15 and len(test) == 5 and train.column_names == ["prompt"]
    assert sorted(list(train["prompt"]) + list(test["prompt"])) == sorted(f"{n}{i}" for n in "ab" for i in range(10))
    with pytest.raises(ValueError, match="keep one"):
        load_prompts(TrainScriptArguments(datasets=args.datasets, dataset_name="builtin:reversal"))


def test_saved_dataset_dict_split_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    from trl_trm.data import load_prompts
    from trl_trm.recipe import TrainScriptArguments

    path = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])}).save_to_disk(str(path))
    args = TrainScriptArguments(dataset_name=str(path), max_train_samples=1)
    assert load_prompts(args)["prompt"] == ["a"]
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]"):
        load_prompts(args, split="test")


def test_chat_prompt_and_system_prompt(tmp_path):
    from trl_trm.data import load_prompts
    from trl_trm.recipe import TrainScriptArguments

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    args = TrainScriptArguments(dataset_name=str(data), prompt_column="question", system_prompt="Be brief.")
    row = load_prompts(args)[0]
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert row["answer"] == "#### 4" and "question" not in row


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"Cannot read dataset file .*d.jsonl': line 2: "),
        ("d.jsonl", '{"prompt": "a"}\n[1, 2]\n', r"line 2: a list, not a JSON object"),
        ("d.jsonl", "\n  \n", r"is empty: give a file with one JSON object"),
        ("d.txt", "prompt\na\n", r"unsupported extension '.txt': use one of .json, .jsonl, .parquet, .csv"),
    ],
)
def test_a_bad_local_file_is_named_with_its_problem(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompts(TrainScriptArguments(dataset_name=str(tmp_path / name)))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "No dataset: set `dataset_name`"),
        ({"dataset_name": "builtin:reversal", "dataset_config": "main"}, "`dataset_config: main` applies to a Hub"),
        ({"dataset_name": "builtin:reversal", "prompt_column": "q"}, "has no prompt column 'q'"),
    ],
)
def test_a_source_that_cannot_work_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        load_prompts(TrainScriptArguments(**fields))


def test_prompt_column_replaces_an_existing_prompt_column_and_max_train_samples_cuts_train_only(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": f"q{i}", "prompt": "old"} for i in range(5)])
    args = TrainScriptArguments(dataset_name=path, prompt_column="q", max_train_samples=2)
    data = load_prompts(args)
    assert data.column_names == ["prompt"] and data["prompt"] == ["q0", "q1"]
    empty = _jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="has no rows"):
        load_prompts(TrainScriptArguments(dataset_name=empty, max_train_samples=0))


def test_load_train_eval_loads_the_test_split_only_when_evaluating():
    args = TrainScriptArguments(dataset_name="builtin:reversal")
    train, evaluation = load_train_eval(args, SimpleNamespace(seed=0, eval_strategy="no"))
    assert len(train) > 0 and evaluation is None
    train, evaluation = load_train_eval(args, SimpleNamespace(seed=0, eval_strategy="steps"))
    assert len(evaluation) > 0 and evaluation["prompt"] != train["prompt"][: len(evaluation)]  # the test split
