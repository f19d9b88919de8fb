"""Capture the rollout engine's sampling log-probs when TRL generates with plain transformers.

TRL records sampling log-probs for vLLM and `rollout_func`, but not for `model.generate`. The processed scores
(after temperature, top-k/top-p and every other logits processor) are only exposed by `generate` through
`output_scores=True, return_dict_in_generate=True`: a `LogitsProcessor` passed to `generate` runs *before* the
temperature/top-k/top-p warpers, so it would see unprocessed scores. :func:`record_sampling_logprobs` therefore
wraps `model.generate` on the instance for the duration of one TRL generation call, asks for the processed
scores, reduces them to the sampled tokens' log-probs and returns the plain token tensor TRL expects.

Memory: `generate` holds one (B, V) score tensor per generated step until it returns (as it does for any
`output_scores=True` call); they are reduced to (B, T) float32 right after. For large vocabularies and long
completions, use vLLM, which reports log-probs itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch


def sampled_token_logprobs(scores: tuple[torch.Tensor, ...], sequences: torch.Tensor) -> torch.Tensor:
    """Log-probs of the generated tokens under the processed sampling distribution.

    Args:
        scores: T_gen tensors of shape (B, V): `generate`'s processed scores, one per generated step.
        sequences: (B, P + T_gen) prompt followed by the generated tokens.

    Returns:
        (B, T_gen) float32 log pi_roll(y_t | c_t).
    """
    num_steps = len(scores)
    generated = sequences[:, sequences.size(1) - num_steps :]  # (B, T_gen)
    columns = [
        torch.log_softmax(step_scores.float(), dim=-1).gather(-1, generated[:, t : t + 1])  # (B, 1)
        for t, step_scores in enumerate(scores)
    ]
    if not columns:
        return sequences.new_zeros((sequences.size(0), 0), dtype=torch.float32)
    return torch.cat(columns, dim=1)


class _Recorder:
    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None  # (B, T_gen) from the last generate call


@contextlib.contextmanager
def record_sampling_logprobs(model: torch.nn.Module) -> Iterator[_Recorder]:
    """Within the context, `model.generate(...)` also records the sampled tokens' processed log-probs into the
    yielded recorder's `logprobs` and still returns a plain (B, P + T_gen) token tensor."""
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
