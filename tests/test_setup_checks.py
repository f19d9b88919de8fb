"""`trl_trm.setup_checks`: the start-up checks of `TRMTrainer` on a duck-typed trainer, without building one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trl_trm.setup_checks import check_trainer_setup, trm_config_for


def _trainer(trm_mode="trm", continuous=False, rollout_func=None, aux=False, fsdp="", distributed="MULTI_CPU"):
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        args=SimpleNamespace(trm_mode=trm_mode, fsdp=fsdp),
        accelerator=SimpleNamespace(distributed_type=DistributedType(distributed)),
        use_transformers_continuous_batching=continuous,
        rollout_func=rollout_func,
        aux_loss_enabled=aux,
    )


def test_a_plain_setup_passes():
    check_trainer_setup(_trainer())
    check_trainer_setup(_trainer(fsdp="full_shard", distributed="FSDP"))


def test_continuous_batching_needs_a_rollout_func_or_trm_mode_none():
    with pytest.raises(ValueError, match="continuous batching"):
        check_trainer_setup(_trainer(continuous=True))
    check_trainer_setup(_trainer(continuous=True, rollout_func=len))  # the rollout_func supplies the log-probs
    check_trainer_setup(_trainer(continuous=True, trm_mode="none"))


def test_the_moe_router_loss_is_no_longer_refused():
    check_trainer_setup(_trainer(aux=True, trm_mode="token_mis"))  # masked per token in trl_trm/moe.py
    check_trainer_setup(_trainer(aux=True, trm_mode="none"))


def test_fsdp_that_accelerate_dropped_is_refused_with_the_distributed_type():
    with pytest.raises(ValueError, match=r"`fsdp='full_shard'` has no effect here: .*MULTI_CPU"):
        check_trainer_setup(_trainer(fsdp="full_shard"))


def test_config_type():
    from trl import GRPOConfig

    from trl_trm import TRMConfig

    args = TRMConfig(output_dir="/tmp/unused", use_cpu=True)
    assert trm_config_for("org/model", args) is args
    with pytest.raises(TypeError, match="TRMTrainer needs a `TRMConfig`, got a GRPOConfig"):
        trm_config_for("org/model", GRPOConfig(output_dir="/tmp/unused", use_cpu=True))
    with pytest.raises(TypeError, match="got a dict"):
        trm_config_for("org/model", {})
