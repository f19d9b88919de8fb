"""One TRMTrainer step, optionally under FSDP2, for the 1-process vs 2-process comparison in tests/test_fsdp.py.

Usage: torchrun --nproc_per_node N fsdp_step.py MODEL_DIR OUT_JSON GLOBAL_BATCH [--fsdp] [--mode trm|trm_exact]
       [--peft] [--save]

The completions and rollout log-probs come from the deterministic `rollout_func` of dist_step.py (plus a top-k list
per token for `trm_exact`), so 1 and 2 processes see the same global batch. With ``--fsdp`` the model is sharded by
Accelerate's FSDP plugin, version 2 (`fully_shard`), over gloo on CPU: TrainingArguments ``fsdp=True,
fsdp_config={"version": 2, ...}``. The JSON holds the first log, the world size, what FSDP did to the model (the type
of the LM head weight, the number of `FSDPModule`s) and, for ``trm_exact``, what weight the fused-LM-head capture saw.
"""

import argparse
import contextlib
import json
import os

import torch
from datasets import Dataset
from dist_step import reward, rollout_func

from trl_trm import TRMConfig, TRMTrainer
from trl_trm import topk as trm_topk
from trl_trm.distributed import shutdown_distributed

TOPK = 4


def rollout_func_topk(prompts, trainer):
    """dist_step's rollout plus `TOPK` distinct ids per token with made-up rollout log-probs (deterministic)."""
    out = rollout_func(prompts, trainer)
    vocab = len(trainer.processing_class)
    lps, ids = [], []
    for comp in out["completion_ids"]:
        lps.append([[-5.6 - 0.3 * ((tok * 3 + j) % 5) for j in range(TOPK)] for tok in comp])
        ids.append([[(tok + 1 + 37 * j) % vocab for j in range(TOPK)] for tok in comp])
    return out | {"topk_logprobs": lps, "topk_token_ids": ids}


def allow_fsdp_on_cpu() -> None:
    """Let Accelerate's FSDP plugin run on CPU processes (gloo): a workaround, for this CPU test only.

    `accelerate.state.AcceleratorState.__init__` (accelerate 1.15) switches to `DistributedType.FSDP` only when the
    process group is of an accelerator type (MULTI_GPU, MULTI_XPU, ...); for `MULTI_CPU` it keeps the plugin unused and
    the run silently becomes DDP (checked in tests/test_fsdp.py). PyTorch's `fully_shard` itself supports CPU tensors
    with gloo. This sets the distributed type to FSDP after the state is built, so that Accelerate's own FSDP2 path
    (`fsdp2_prepare_model`: `fully_shard` per decoder layer and the root, DTensor parameters, full state dict on save)
    runs unchanged.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as the GPU path does

    AcceleratorState.__init__ = __init__


@contextlib.contextmanager
def watch_head_weight(seen: list):
    """Record the type and shape of the LM-head weight that TRL's fused head passes to `FusedHeadCapture._on_call`
    (under FSDP2: the unsharded parameter, or a DTensor shard?)."""
    original = trm_topk.FusedHeadCapture._on_call

    def on_call(self, hidden, weight, *args, **kwargs):
        seen.append({"type": type(weight).__name__, "shape": list(weight.shape)})
        return original(self, hidden, weight, *args, **kwargs)

    trm_topk.FusedHeadCapture._on_call = on_call
    try:
        yield
    finally:
        trm_topk.FusedHeadCapture._on_call = original


def run(
    model_dir: str, out: str, global_batch: int, fsdp=False, mode="trm", peft=False, save=False, device="cpu"
) -> dict:
    """Train one step; return what the JSON holds. ``save``: `trainer.save_model(out + ".model")` (every rank).
    ``device="cuda"``: Accelerate's default device instead of ``use_cpu=True`` (tests/test_gpu.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    exact = mode == "trm_exact"
    kwargs = {}
    if fsdp:
        kwargs = dict(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        )
    mode_kwargs = (
        dict(trm_mode="trm_exact", trm_rollout_topk=TOPK, trm_delta_kl=2e-3, trm_delta_avg=None)
        if exact
        else dict(trm_delta_max=1.2, trm_delta_avg=None)
    )
    args = TRMConfig(
        output_dir=out + ".d",
        use_cpu=device == "cpu",
        bf16=False,
        per_device_train_batch_size=global_batch // world,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-3,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        loss_type="dapo",
        disable_tqdm=True,
        **mode_kwargs,
        **kwargs,
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    seen: list = []
    ds = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(64)])
    trainer = TRMTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        rollout_func=rollout_func_topk if exact else rollout_func,
        peft_config=peft_config,
    )
    with watch_head_weight(seen):
        trainer.train()
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    info = {
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "head_weight_type": type(head).__name__,
        "head_weight_local_shape": list(getattr(head, "_local_tensor", head).shape),
        "capture_weights": seen,
        "log": trainer.state.log_history[0],
    }
    if save:
        trainer.save_model(out + ".model")  # every rank: FSDP gathers the full state dict collectively
    return info


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_json")
    parser.add_argument("global_batch", type=int)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--mode", default="trm", choices=["trm", "trm_exact"])
    parser.add_argument("--peft", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--no-cpu-fsdp-workaround", dest="workaround", action="store_false")
    a = parser.parse_args()
    if a.fsdp and a.workaround:
        allow_fsdp_on_cpu()
    info = run(a.model_dir, a.out_json, a.global_batch, fsdp=a.fsdp, mode=a.mode, peft=a.peft, save=a.save)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(a.out_json, "w") as f:
            json.dump(info, f)
    shutdown_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
