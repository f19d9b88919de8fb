"""Helpers for the real-vLLM tests: a tiny-model trainer factory and spies on what vLLM returned and what the mask saw.

Imported by the test modules of this folder (pytest puts it on `sys.path`); vLLM itself is imported lazily.
"""

from __future__ import annotations

import math

import torch
from trainer_kwargs import base_config_kwargs, length_reward  # noqa: F401  (re-exported to tests)


def vllm_config_kwargs(output_dir, **overrides):
    """TRMConfig kwargs for a fast colocated-vLLM CPU run: the main suite's settings with training in fp32
    (`bf16=False`); TRL passes no dtype to vLLM, which then serves the fp32 checkpoint in bf16 on CPU: a real
    rollout/training mismatch."""
    vllm = dict(
        bf16=False,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,  # prompt (< 16 tokens) + 12 completion tokens
        vllm_gpu_memory_utilization=0.1,  # GPU-only setting; the CPU KV cache is VLLM_CPU_KVCACHE_SPACE (conftest)
    )
    return base_config_kwargs(output_dir, **{**vllm, **overrides})


class VLLMGenerateSpy:
    """Wraps a colocated `vllm.LLM.generate`: records, per completion, the token ids and the sampled-token log-probs
    exactly as vLLM returned them. `nan_at=(sequence, position)` overwrites one returned log-prob with NaN (in the real
    `RequestOutput`, before TRL reads it), once per call."""

    def __init__(self, llm, nan_at: tuple[int, int] | None = None):
        self.llm = llm
        self.original = llm.generate
        self.nan_at = nan_at
        self.records: list[tuple[list[int], tuple[int, ...], list[float]]] = []  # (prompt, completion, logps)
        llm.generate = self

    def __call__(self, *args, **kwargs):
        outputs = self.original(*args, **kwargs)
        pairs = [(list(request.prompt_token_ids), c) for request in outputs for c in request.outputs]
        completions = [c for _, c in pairs]
        if self.nan_at is not None:
            seq, pos = self.nan_at
            pos = min(pos, len(completions[seq].token_ids) - 1)
            entry = completions[seq].logprobs[pos]
            entry[completions[seq].token_ids[pos]].logprob = float("nan")
        for prompt, c in pairs:
            logps = [c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)]
            self.records.append((prompt, tuple(c.token_ids), logps))
        return outputs

    def remove(self):
        self.llm.generate = self.original

    def by_completion(self) -> dict[tuple[int, ...], list[float]]:
        return {completion: logps for _, completion, logps in self.records}

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return [(prompt, list(completion)) for prompt, completion, _ in self.records]


class MaskInputSpy:
    """Wraps `TRMTrainer._trm_mask`: records the current-policy (training engine) log-probs, the rollout log-probs and
    the completion ids of every batch the mask was evaluated on."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.original = trainer._trm_mask
        self.batches: list[dict[str, torch.Tensor]] = []
        trainer._trm_mask = self

    def __call__(self, per_token_logps, inputs, *args, **kwargs):
        self.batches.append(
            {
                "theta": per_token_logps.detach().float().clone(),  # (B, T)
                "roll": inputs["sampling_per_token_logps"].detach().float().clone(),  # (B, T)
                "mask": inputs["completion_mask"].detach().clone(),  # (B, T)
                "ids": inputs["completion_ids"].detach().clone(),  # (B, T)
            }
        )
        return self.original(per_token_logps, inputs, *args, **kwargs)

    def remove(self):
        self.trainer._trm_mask = self.original


def rows(batch):
    """Yield (completion ids, theta log-probs, rollout log-probs) per valid sequence of a recorded batch."""
    for i in range(batch["ids"].size(0)):
        n = int(batch["mask"][i].sum())
        yield tuple(batch["ids"][i, :n].tolist()), batch["theta"][i, :n], batch["roll"][i, :n]


def logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def reset_optimizer(trainer):
    """A later `train()` call starts from a fresh optimizer (no Adam momentum left from an earlier call)."""
    trainer.optimizer = None
    trainer.lr_scheduler = None


@torch.no_grad()
def trainer_logps(model, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """fp32 training-engine log-probs of each completion token given its prompt. `sequences`: (prompt, completion)."""
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion])  # (1, P + C)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (C, V)
        out.append(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0])  # (C,)
    return out


def vllm_logps(llm, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """The colocated engine's log-probs of each completion token given its prompt (prompt log-probs, one pass)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    outputs = llm.generate([{"prompt_token_ids": p + c} for p, c in sequences], params, use_tqdm=False)
    out = []
    for (prompt, completion), request in zip(sequences, outputs, strict=True):
        entries = request.prompt_logprobs[len(prompt) :]  # (C,) dicts keyed by token id
        out.append(torch.tensor([e[tok].logprob for e, tok in zip(entries, completion, strict=True)]))
    return out


def free_vllm(trainer) -> None:
    """Drop a trainer's colocated vLLM engine (its CPU KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB)."""
    import gc

    generation = getattr(trainer, "vllm_generation", None)
    if generation is not None and hasattr(generation, "llm"):
        del generation.llm
    gc.collect()


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
