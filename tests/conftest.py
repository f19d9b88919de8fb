"""Shared fixtures: a tiny model and tokenizer built locally (no download), a toy dataset and a trainer factory."""

from __future__ import annotations

import os

import pytest
from trainer_kwargs import base_config_kwargs, length_reward

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from trl_trm.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def toy_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"{i}+{i % 7}="} for i in range(64)])


@pytest.fixture
def make_trainer(tiny_model_dir, toy_dataset, tmp_path):
    """Factory: `make_trainer(peft_config=None, rollout_func=None, **config_overrides) -> TRMTrainer`."""
    from trl_trm import TRMConfig, TRMTrainer

    def _make(peft_config=None, rollout_func=None, reward_funcs=length_reward, **overrides):
        output_dir = overrides.pop("output_dir", tmp_path / "out")
        args = TRMConfig(**base_config_kwargs(output_dir, **overrides))
        return TRMTrainer(
            model=tiny_model_dir,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=toy_dataset,
            peft_config=peft_config,
            rollout_func=rollout_func,
        )

    return _make
