"""Capture the rollout engine's sampling log-probs when TRL generates with plain transformers.

TRL records sampling log-probs for vLLM and `rollout_func`, but not for `model.generate`. The processed scores
(after temperature, top-k/top-p and every other logits processor) are only exposed by `generate` through
`output_scores=True, return_dict_in_generate=True`: a `LogitsProcessor` passed to `generate` runs *before* the
temperature/top-k/top-p warpers, so it would see unprocessed scores. :func:`record_sampling_logprobs` therefore
wraps `model.generate` on the instance for the duration of one TRL generation call, asks for the processed
scores, reduces them to the sampled tokens' log-probs and returns the plain token tensor TRL expects.

With ``topk=k > 0`` (`trm_exact`, see :mod:`trl_trm.topk`) each step's processed distribution is also reduced to its
k most probable tokens: (B, T, k) log-probs and ids, sorted by descending probability. The sampled token is not
added as an extra slot: its log-prob is the sampled-token log-prob above, and the loss adds it as one more outcome
when it is not among the top-k. Tokens removed by top-k/top-p sampling have log-prob -inf (probability 0); if fewer
than k tokens are left they still fill slots, with -inf, which is exact information, not missing data.

Memory: `generate` holds one (B, V) score tensor per generated step until it returns (as it does for any
`output_scores=True` call); they are reduced to (B, T) float32 (plus (B, T, k) with ``topk``) right after. For
large vocabularies and long completions, use vLLM, which reports log-probs itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch


def processed_logprobs(
    scores: tuple[torch.Tensor, ...], sequences: torch.Tensor, topk: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs under the processed sampling distribution: the generated tokens' and, with ``topk > 0``, the top-k.

    Args:
        scores: T_gen tensors of shape (B, V): `generate`'s processed scores, one per generated step.
        sequences: (B, P + T_gen) prompt followed by the generated tokens.
        topk: k most probable tokens to keep per step (0: none). Clipped to V.

    Returns:
        (B, T_gen) float32 log pi_roll(y_t | c_t); with ``topk``, (B, T_gen, min(k, V)) float32 top-k log-probs
        sorted by descending probability and their (B, T_gen, min(k, V)) long token ids, else None, None.
    """
    num_steps = len(scores)
    batch = sequences.size(0)
    generated = sequences[:, sequences.size(1) - num_steps :]  # (B, T_gen)
    sampled, top_values, top_ids = [], [], []
    for t, step_scores in enumerate(scores):
        logp = torch.log_softmax(step_scores.float(), dim=-1)  # (B, V), one step at a time
        sampled.append(logp.gather(-1, generated[:, t : t + 1]))  # (B, 1)
        if topk > 0:
            values, ids = logp.topk(min(topk, logp.size(-1)), dim=-1)  # (B, k), sorted descending
            top_values.append(values)
            top_ids.append(ids)
    if not sampled:
        empty = sequences.new_zeros((batch, 0), dtype=torch.float32)
        if topk <= 0:
            return empty, None, None
        return empty, sequences.new_zeros((batch, 0, topk), dtype=torch.float32), sequences.new_zeros((batch, 0, topk))
    logprobs = torch.cat(sampled, dim=1)  # (B, T_gen)
    if topk <= 0:
        return logprobs, None, None
    return logprobs, torch.stack(top_values, dim=1), torch.stack(top_ids, dim=1)  # (B, T_gen, k) each


def sampled_token_logprobs(scores: tuple[torch.Tensor, ...], sequences: torch.Tensor) -> torch.Tensor:
    """(B, T_gen) float32 log-probs of the generated tokens under the processed sampling distribution (see
    :func:`processed_logprobs`)."""
    return processed_logprobs(scores, sequences)[0]


class _Recorder:
    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None  # (B, T_gen) from the last generate call
        self.topk_logprobs: torch.Tensor | None = None  # (B, T_gen, k) with `topk`, sorted descending
        self.topk_ids: torch.Tensor | None = None  # (B, T_gen, k) long


@contextlib.contextmanager
def record_sampling_logprobs(model: torch.nn.Module, topk: int = 0) -> Iterator[_Recorder]:
    """Within the context, `model.generate(...)` also records the sampled tokens' processed log-probs into the
    yielded recorder's `logprobs` (and, with ``topk > 0``, the processed top-k log-probs and ids into `topk_logprobs`
    and `topk_ids`) and still returns a plain (B, P + T_gen) token tensor."""
    recorder = _Recorder()
    original_generate = model.generate
    shadowed = "generate" in vars(model)

    def generate(*args, **kwargs):
        if kwargs.get("generation_config") is not None:  # set the flags on a copy, not beside it (deprecated)
            config = copy.deepcopy(kwargs["generation_config"])
            config.output_scores = True
            config.return_dict_in_generate = True
            kwargs["generation_config"] = config
        else:
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        out = original_generate(*args, **kwargs)
        if topk > 0:
            recorder.logprobs, recorder.topk_logprobs, recorder.topk_ids = processed_logprobs(
                out.scores, out.sequences, topk
            )
        else:  # looked up at call time: benchmarks/bench_trainer_overhead.py times this function
            recorder.logprobs = sampled_token_logprobs(out.scores, out.sequences)
        return out.sequences

    model.generate = generate
    try:
        yield recorder
    finally:
        if shadowed:
            model.generate = original_generate
        else:
            del model.generate
