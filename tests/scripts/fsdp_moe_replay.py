"""One TRMTrainer step on a tiny Qwen3-MoE under FSDP2 with `trm_routing_replay=True`, plain transformers generation
(the routes are recorded), for tests/test_fsdp.py.

Usage: torchrun --nproc_per_node 2 fsdp_moe_replay.py MODEL_DIR OUT_JSON

fp32 generation and training (identical engines): every completion token's routing must agree. The JSON holds the
world size, the distributed type, the type of a router weight between steps (a DTensor shard under FSDP2), the
number of routers the replay hooks sit on and the first log.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from dist_step import reward
from fsdp_step import allow_fsdp_on_cpu

from trl_trm import TRMConfig, TRMTrainer
from trl_trm.distributed import shutdown_distributed


def main():
    model_dir, out_json = sys.argv[1], sys.argv[2]
    allow_fsdp_on_cpu()
    args = TRMConfig(
        output_dir=out_json + ".d",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-3,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        trm_routing_replay=True,
        fsdp=True,
        fsdp_config={
            "version": 2,
            "transformer_layer_cls_to_wrap": ["Qwen3MoeDecoderLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    )
    ds = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(64)])
    trainer = TRMTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=ds)
    trainer.train()
    router = trainer._trm_routing.forcer.routers[0]
    info = {
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "router_weight_type": type(router.weight).__name__,
        "routers": len(trainer._trm_routing.forcer.routers),
        "log": trainer.state.log_history[0],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_json, "w") as f:
            json.dump(info, f)
    shutdown_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
