"""Capture the rollout engine's sampling log-probs when TRL generates with plain transformers.

TRL records sampling log-probs for vLLM and `rollout_func`, but not for `model.generate`. What TRM compares with the
training policy is the *processed* distribution each token was sampled from: after temperature, top-k/top-p/min-p,
repetition penalty and every other logits processor. :func:`record_sampling_logprobs` records it as generation goes:

* a `LogitsProcessor` is appended at the very end of the list `generate` builds (by shadowing
  `model._get_logits_processor` on the instance for the duration of the context), so it sees the scores after every
  processor and warper, exactly the tensor `generate` samples from (and the one `output_scores=True` would return). A
  `LogitsProcessor` passed to `generate(logits_processor=...)` would instead run *before* the temperature/top-k/top-p
  warpers and see unprocessed scores;
* a `StoppingCriteria` appended the same way (it never stops anything) sees the token sampled from those scores right
  after it is appended to the sequence, in the same decoding step, and reduces the step's (B, V) scores to the
  sampled token's log-prob (and, with ``topk``, the top-k), then drops them.

Generation itself is untouched: `generate` returns what the caller asked for (TRL: a plain token tensor), the same
sampled tokens. The recorded values are bit-identical to reducing `output_scores=True` scores with
:func:`processed_logprobs` (same operations on the same tensors; `tests/test_rollout.py` checks it with `torch.equal`).

Only multinomial sampling (`do_sample=True`, `num_beams=1`, no assistant / prompt lookup) has a per-token sampling
distribution. For any other generation mode (greedy, beam search, contrastive, assisted, constrained) nothing is
recorded and `recorder.problem` names the mode and the settings that selected it. A `generate` that produces tokens
without running transformers' sampler (a mock, a replaced `generate`) records nothing either. The trainer's
:class:`RolloutLogprobChecks` checks the recorded tokens against the completion it receives (:func:`recording_problem`)
and turns a problem into an error (TRM modes) or one warning (`trm_mode="none"`).

With ``topk=k > 0`` (`trm_exact`, see :mod:`trl_trm.topk`) each step's processed distribution is also reduced to its
k most probable tokens: (B, T, k) log-probs and ids, sorted by descending probability (the sampled token is not added
as a slot: the loss adds it as one more outcome when it is not among them). Tokens removed by top-k/top-p sampling
have log-prob -inf; if fewer than k are left they still fill slots, with -inf: exact information, not missing data.

Memory: O(B·T) values (O(B·T·k) with ``topk``), one float32 log-prob and one token id per generated token; each
step's (B, V) scores are reduced in the same step (one float32 (B, V) `log_softmax` temporary at a time) and
`output_scores=True` is not requested. At V = 151,936 and 32 completions x 256 tokens holding the scores peaked at
4.76 GiB against GRPOTrainer's 2.21 GiB; the capture peaks at GRPOTrainer's own (`benchmarks/bench_capture_memory.py`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationMixin, LogitsProcessor, StoppingCriteria
from transformers.generation.configuration_utils import GenerationMode


def processed_logprobs(
    scores: tuple[torch.Tensor, ...], sequences: torch.Tensor, topk: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs under the processed sampling distribution: the generated tokens' and, with ``topk > 0``, the top-k.

    The reference reduction of `generate(output_scores=True)` scores (O(B·T·V) memory: they are all held). The
    trainer records the same values step by step with :func:`record_sampling_logprobs`; this function is its test
    oracle.

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


def _reduce_step(
    scores: torch.Tensor, tokens: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decoding step: (B, V) processed scores and the (B,) sampled tokens -> (B, 1) log-prob of the sampled token
    and, with ``topk``, the (B, min(k, V)) top-k log-probs (sorted descending) and ids: the same operations as
    :func:`processed_logprobs`, which is kept separate as the test oracle."""
    logp = torch.log_softmax(scores.float(), dim=-1)  # (B, V), one step at a time
    sampled = logp.gather(-1, tokens.unsqueeze(-1))  # (B, 1)
    if topk <= 0:
        return sampled, None, None
    values, ids = logp.topk(min(topk, logp.size(-1)), dim=-1)  # (B, k), sorted descending
    return sampled, values, ids


_SETTINGS = {  # which `generate` settings select each non-sampling mode (for the error message)
    GenerationMode.GREEDY_SEARCH: "do_sample=False",
    GenerationMode.CONTRASTIVE_SEARCH: "do_sample=False with penalty_alpha > 0",
    GenerationMode.BEAM_SEARCH: "num_beams > 1",
    GenerationMode.BEAM_SAMPLE: "num_beams > 1",
    GenerationMode.GROUP_BEAM_SEARCH: "num_beams > 1 with num_beam_groups > 1",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "constraints / force_words_ids",
    GenerationMode.ASSISTED_GENERATION: "assistant_model / prompt_lookup_num_tokens / assistant_early_exit / use_mtp",
}


def unsupported_generation_mode(generation_config, assistant_model=None) -> str | None:
    """None when ``generation_config`` samples one token at a time from a per-token distribution (multinomial sampling),
    else a description of the mode and the settings that select it (greedy, beam search, ... have no sampling
    distribution whose log-probs could be recorded)."""
    try:
        mode = generation_config.get_generation_mode(assistant_model)
    except TypeError:  # older signature
        mode = generation_config.get_generation_mode()
    if mode == GenerationMode.SAMPLE:
        return None
    settings = _SETTINGS.get(mode, "its generation settings")
    details = f"num_beams={generation_config.num_beams}, do_sample={generation_config.do_sample}"
    return f"{getattr(mode, 'value', mode)} ({settings}; here {details})"


class _Run:
    """The state of one decoding loop (one `_get_logits_processor` call inside `generate`)."""

    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.pending: tuple[int, torch.Tensor] | None = None  # (sequence length L, (B, V) scores sampled at L)
        self.logprobs: list[torch.Tensor] = []  # T_gen tensors (B, 1)
        self.tokens: list[torch.Tensor] = []  # T_gen tensors (B, 1)
        self.positions: list[int] = []  # index of each step's token in the sequence
        self.topk_logprobs: list[torch.Tensor] = []  # T_gen tensors (B, k)
        self.topk_ids: list[torch.Tensor] = []

    def scores_seen(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        self.token_seen(input_ids)  # a step whose token the criterion did not see (defensive; never in `_sample`)
        self.pending = (input_ids.size(1), scores)

    def token_seen(self, input_ids: torch.Tensor) -> None:
        if self.pending is None:
            return
        length, scores = self.pending
        if input_ids.size(1) <= length:
            return
        self.pending = None
        tokens = input_ids[:, length]  # (B,) the token sampled from `scores`
        logp, values, ids = _reduce_step(scores, tokens, self.topk)
        self.logprobs.append(logp)
        self.tokens.append(tokens.unsqueeze(1))
        self.positions.append(length)
        if values is not None:
            self.topk_logprobs.append(values)
            self.topk_ids.append(ids)


class _StepProcessor(LogitsProcessor):
    """Appended last: sees the fully processed scores of each step and returns them unchanged."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.run.scores_seen(input_ids, scores)
        return scores


class _TokenCriterion(StoppingCriteria):
    """Sees the sampled token right after it is appended; reduces the step's scores. Never stops generation."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.run.token_seen(input_ids)
        return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)


class _Recorder:
    """What the last `generate` call inside :func:`record_sampling_logprobs` recorded.

    Attributes:
        logprobs: (B, T_gen) float32 processed log-probs of the sampled tokens, or None if nothing was sampled through
            transformers' sampler.
        token_ids: (B, T_gen) long: the tokens those log-probs belong to (for consistency checks).
        topk_logprobs, topk_ids: (B, T_gen, min(k, V)) with ``topk > 0``, else None.
        problem: why nothing was recorded for a non-sampling generation mode (see
            :func:`unsupported_generation_mode`), else None.
        num_runs: decoding loops seen since the context was entered.
    """

    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.logprobs: torch.Tensor | None = None
        self.token_ids: torch.Tensor | None = None
        self.topk_logprobs: torch.Tensor | None = None
        self.topk_ids: torch.Tensor | None = None
        self.problem: str | None = None
        self.num_runs = 0
        self._run: _Run | None = None

    def _start(self) -> _Run:
        self._finish()
        self._run = _Run(self.topk)
        self.num_runs += 1
        self.logprobs = self.token_ids = self.topk_logprobs = self.topk_ids = None
        self.problem = None
        return self._run

    def _finish(self, length: int | None = None) -> None:
        """Concatenate the current run's steps. ``length``: the returned sequences' length, when known; a step sampled
        at a position at or beyond it was undone by `generate` (transformers' deferred stop check) and is dropped."""
        run, self._run = self._run, None
        if run is None or not run.logprobs:
            return
        keep = len(run.logprobs) if length is None else sum(position < length for position in run.positions)
        batch = run.tokens[0].size(0)
        self.logprobs = torch.cat(run.logprobs[:keep], dim=1) if keep else run.logprobs[0].new_zeros((batch, 0))
        self.token_ids = torch.cat(run.tokens[:keep], dim=1) if keep else run.tokens[0].new_zeros((batch, 0))
        if self.topk > 0:
            if keep:
                self.topk_logprobs = torch.stack(run.topk_logprobs[:keep], dim=1)  # (B, T_gen, k)
                self.topk_ids = torch.stack(run.topk_ids[:keep], dim=1)
            else:
                self.topk_logprobs = self.logprobs.new_zeros((batch, 0, self.topk))
                self.topk_ids = self.token_ids.new_zeros((batch, 0, self.topk))


@contextlib.contextmanager
def record_sampling_logprobs(model: torch.nn.Module, topk: int = 0) -> Iterator[_Recorder]:
    """Within the context, every `generate(...)` of ``model`` (or of a transformers model inside it, e.g. under a PEFT
    wrapper) also records the sampled tokens' processed log-probs into the yielded recorder's `logprobs` (and, with
    ``topk > 0``, the processed top-k log-probs and ids into `topk_logprobs` and `topk_ids`), step by step, in O(B·T)
    memory. `generate`'s arguments and return value are not changed.

    Args:
        model: the model whose `generate` TRL calls (the unwrapped policy).
        topk: k most probable tokens to record per step (0: none).

    Yields:
        The recorder; its fields describe the last `generate` call (see `_Recorder`).
    """
    recorder = _Recorder(topk)
    modules = [m for m in model.modules() if isinstance(m, GenerationMixin)] if hasattr(model, "modules") else []
    if isinstance(model, GenerationMixin) and model not in modules:
        modules.insert(0, model)
    patched = []

    def make_processor_hook(module):
        original = module._get_logits_processor

        def _get_logits_processor(*args, **kwargs):
            processors = original(*args, **kwargs)
            config = kwargs.get("generation_config", args[0] if args else None)
            run = recorder._start()
            problem = unsupported_generation_mode(config) if config is not None else None
            if problem is not None:
                recorder.problem = problem
                recorder._run = None
                return processors
            processors.append(_StepProcessor(run))
            return processors

        return _get_logits_processor

    def make_criteria_hook(module):
        original = module._get_stopping_criteria

        def _get_stopping_criteria(*args, **kwargs):
            criteria = original(*args, **kwargs)
            if recorder._run is not None:
                criteria.append(_TokenCriterion(recorder._run))
            return criteria

        return _get_stopping_criteria

    for module in modules:
        for name, make in (
            ("_get_logits_processor", make_processor_hook),
            ("_get_stopping_criteria", make_criteria_hook),
        ):
            patched.append((module, name, name in vars(module), getattr(module, name)))
            setattr(module, name, make(module))

    original_generate = model.generate
    shadowed = "generate" in vars(model)

    def generate(*args, **kwargs):
        out = original_generate(*args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        recorder._finish(sequences.size(-1) if isinstance(sequences, torch.Tensor) else None)
        return out

    model.generate = generate
    try:
        yield recorder
    finally:
        recorder._finish()
        if shadowed:
            model.generate = original_generate
        else:
            del model.generate
        for module, name, was_shadowed, original in reversed(patched):
            if was_shadowed:
                setattr(module, name, original)
            else:
                delattr(module, name)


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

    def _missing(self, trm_mode: str, error: str, warning: str) -> None:
        if trm_mode != "none":
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
        error = f"`trm_mode={trm_mode!r}` needs the rollout log-probs: {problem}"
        self._missing(trm_mode, error, f"{problem} The trm/ diagnostics are skipped (trm_mode='none').")
        return None

    def generated(self, completion_ids: list, logprobs: list | None, trm_mode: str, rollout_func: bool) -> None:
        """`GRPOTrainer._generate`'s log-probs: present with a TRM mode, well formed from a ``rollout_func``, and one
        per completion token (TRL would pad a short list silently)."""
        if logprobs is None:
            source = "`rollout_func`" if rollout_func else "the generation backend"
            error = (
                f"`trm_mode={trm_mode!r}` needs the rollout engine's per-token log-probs, but {source} returned "
                "`logprobs=None`. Return one log-prob per completion token (vLLM: `SamplingParams(logprobs=0)` gives "
                "the sampled token's), or set `trm_mode='none'`."
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
