"""The checks of the rollout log-probs on every path (transformers capture, vLLM, `rollout_func`): one-line errors
naming the problem and the fix, or, with `trm_mode="none"`, one warning. Re-exported from :mod:`trl_trm.rollout`,
beside the recorder whose output :func:`recording_problem` checks."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .rollout import _Recorder


def check_rollout_logprobs(completion_ids: list, logprobs: Any) -> None:
    """A `rollout_func`'s `logprobs` must be one list of float log-probs per completion: catch, with the key, the
    sequence index and the fix, what would otherwise fail late inside the loss or pass silently (a flat list of
    floats, lists nested one level too deep, probabilities instead of log-probs)."""
    fix = "Return `logprobs` as one list per completion with one float log π_roll(y_t | c_t) per completion token."
    if not isinstance(logprobs, (list, tuple)):
        raise ValueError(f"`rollout_func` returned `logprobs` of type {type(logprobs).__name__}. {fix}")
    if len(logprobs) != len(completion_ids):
        raise ValueError(
            f"`rollout_func` returned `logprobs` for {len(logprobs)} sequences but {len(completion_ids)} "
            f"`completion_ids`. {fix}"
        )
    for i, seq in enumerate(logprobs):
        if isinstance(seq, (int, float)) or (isinstance(seq, torch.Tensor) and seq.dim() == 0):
            raise ValueError(
                f"`rollout_func` returned `logprobs` as a flat list of numbers: `logprobs[{i}]` is {seq!r}, not "
                f"a list for sequence {i}. {fix} (a list of lists, like `completion_ids`)."
            )
        values = seq.tolist() if isinstance(seq, torch.Tensor) else seq
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"`logprobs[{i}]` (sequence {i}) is a {type(seq).__name__}, not a list. {fix}")
        try:  # fast path: one tensor per sequence
            row = torch.tensor(values, dtype=torch.float64)  # (T_i,) when well formed
        except (TypeError, ValueError, RuntimeError):
            row = None
        if row is None or row.dim() != 1:
            for t, value in enumerate(values):  # slow path, only to name the offending entry
                if isinstance(value, (list, tuple, dict, torch.Tensor)):
                    raise ValueError(
                        f"`rollout_func` returned `logprobs` nested one level too deep: `logprobs[{i}][{t}]` "
                        f"(sequence {i}, token {t}) is a {type(value).__name__}, not a float. Keep only the sampled "
                        f"token's log-prob per position (top-k lists go to `topk_logprobs`/`topk_token_ids`). {fix}"
                    )
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(
                        f"`logprobs[{i}][{t}]` (sequence {i}, token {t}) is {value!r} of type "
                        f"{type(value).__name__}, not a float. {fix}"
                    )
            raise ValueError(f"`logprobs[{i}]` (sequence {i}) cannot be read as floats. {fix}")
        positive = (row > 1e-6) & torch.isfinite(row)  # (T_i,) NaN/inf are left to `trm_nonfinite`
        if positive.any():
            t = int(positive.nonzero()[0])
            raise ValueError(
                f"`rollout_func` returned `logprobs[{i}][{t}] = {values[t]!r}` (sequence {i}, token {t}): a "
                "log-probability is <= 0, so this looks like a probability. Return `math.log(p)` (vLLM: "
                "`Logprob.logprob`, not its `exp`). " + fix
            )


class RolloutLogprobChecks:
    """The trainer's checks of each generated batch's rollout log-probs, before TRL pads them. Missing log-probs are an
    error with a TRM mode (the mask needs them), one warning per trainer with `trm_mode="none"` (no `trm/` metrics)."""

    warned = False  # set on the instance by its first warning
    purpose: str | None = None  # set while something other than the mode needs the log-probs (calibration)

    def _needer(self, trm_mode: str) -> str:
        return self.purpose or f"`trm_mode={trm_mode!r}`"

    def _missing(self, trm_mode: str, error: str, warning: str) -> None:
        if trm_mode != "none" or self.purpose is not None:
            raise ValueError(error)
        if not self.warned:
            warnings.warn(warning, stacklevel=4)  # the caller of the trainer method that called us
            self.warned = True

    def recorded(self, recorder: _Recorder, completion_ids: list, trm_mode: str) -> list[list[float]] | None:
        """One generation turn's per-token log-probs from :func:`record_sampling_logprobs`'s ``recorder``, checked to
        belong to the completion tokens TRL received; None (warned) when there are none and `trm_mode="none"`."""
        if recorder.problem is None and recorder.logprobs is None and not any(completion_ids):
            return [[] for _ in completion_ids]  # nothing was generated, nothing to record
        problem = recording_problem(recorder, completion_ids)
        if problem is None:
            recorded_logprobs = recorder.logprobs.cpu()  # (B, T_gen) float32
            return [recorded_logprobs[i, : len(ids)].tolist() for i, ids in enumerate(completion_ids)]
        error = f"{self._needer(trm_mode)} needs the rollout log-probs: {problem}"
        self._missing(trm_mode, error, f"{problem} The trm/ diagnostics are skipped (trm_mode='none').")
        return None

    def generated(self, completion_ids: list, logprobs: list | None, trm_mode: str, rollout_func: bool) -> None:
        """`GRPOTrainer._generate`'s log-probs: present with a TRM mode, well formed from a ``rollout_func``, and one
        per completion token (TRL would pad a short list silently)."""
        if logprobs is None:
            source = "`rollout_func`" if rollout_func else "the generation backend"
            error = (
                f"{self._needer(trm_mode)} needs the rollout engine's per-token log-probs, but {source} returned "
                "`logprobs=None`. Return one log-prob per completion token (vLLM: `SamplingParams(logprobs=0)` gives "
                "the sampled token's)" + (", or set `trm_mode='none'`." if self.purpose is None else ".")
            )
            warning = "No rollout log-probs are available (trm_mode='none'): the trm/ diagnostics are not logged."
            return self._missing(trm_mode, error, warning)
        if rollout_func:
            check_rollout_logprobs(completion_ids, logprobs)
        for i, (ids, lps) in enumerate(zip(completion_ids, logprobs, strict=True)):
            if len(ids) != len(lps):
                raise ValueError(
                    f"Rollout log-probs do not match the completion: sequence {i} has {len(ids)} completion "
                    f"tokens but {len(lps)} log-probs. Return exactly one log-prob per completion token."
                )


def recording_problem(recorder: _Recorder, completion_ids: list[list[int]]) -> str | None:
    """Why the ``recorder``'s log-probs are not those of ``completion_ids`` (a non-sampling generation mode, a
    `generate` that does not run transformers' sampler, changed rows or tokens), or None when they are."""
    if recorder.problem is not None:
        return (
            f"`generate` ran in {recorder.problem} mode, which has no per-token sampling distribution, so there "
            "are no rollout log-probs (beam search scores are per beam, greedy decoding is deterministic). Use "
            "multinomial sampling: remove `num_beams` (or set `num_beams=1`) and keep `do_sample=True` in "
            "`generation_kwargs` (and in the model's `generation_config`)."
        )
    if recorder.logprobs is None:
        return (
            f"`model.generate` returned {len(completion_ids)} completions, but no token was sampled through "
            "transformers' decoding loop (`generate` is replaced or wrapped so that `GenerationMixin.generate` "
            "never runs, e.g. a mock returning fixed tokens), so their rollout log-probs are unknown. Call the "
            "model's own `generate`, or supply the log-probs with a `rollout_func`."
        )
    recorded = recorder.token_ids.cpu()  # (B, T_gen), one device-to-host copy
    if recorded.size(0) != len(completion_ids):
        return (
            f"`model.generate` recorded {recorded.size(0)} sampled rows for {len(completion_ids)} completions "
            "(`num_return_sequences` or a wrapped `generate` changed the rows), so the log-probs cannot be "
            "matched to the completions. Leave `num_return_sequences` unset (TRL repeats prompts itself)."
        )
    for i, ids in enumerate(completion_ids):
        if len(ids) > recorded.size(1) or recorded[i, : len(ids)].tolist() != list(ids):
            return (
                f"Completion {i} is not the token sequence that transformers sampled (a wrapped `generate` "
                "changed the tokens), so its rollout log-probs are unknown. Return the sampled tokens "
                "unchanged, or supply the log-probs with a `rollout_func`."
            )
    return None
