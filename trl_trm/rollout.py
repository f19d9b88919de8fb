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

Memory: O(B·T) values (O(B·T·k) with ``topk``), written into buffers allocated once per `generate` call, plus one
(B, V) float32 scratch buffer that every step's `log_softmax` is written into; nothing allocated in a step outlives
it, and `output_scores=True` is not requested (holding the scores peaked at 4.76 GiB against GRPOTrainer's 2.21 GiB
at V = 151,936, 32 x 256 tokens). Small per-step results kept as new tensors are not harmless either: glibc placed
them in the (B, V) holes each step freed, and the heap grew by B·V·4 bytes a step in some processes (issue 23;
`tests/test_capture_memory.py`, `benchmarks/bench_capture_memory.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import GenerationMixin, LogitsProcessor, StoppingCriteria
from transformers.generation.configuration_utils import GenerationMode

# The checks of the recorded (and every other path's) log-probs live beside, re-exported here.
from .rollout_checks import RolloutLogprobChecks as RolloutLogprobChecks
from .rollout_checks import check_rollout_logprobs as check_rollout_logprobs
from .rollout_checks import recording_problem as recording_problem


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
    scores: torch.Tensor, tokens: torch.Tensor, topk: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decoding step: (B, V) processed scores and the (B,) sampled tokens -> (B, 1) log-prob of the sampled token
    and, with ``topk``, the (B, min(k, V)) top-k log-probs (sorted descending) and ids: the same operations as
    :func:`processed_logprobs`, which is kept separate as the test oracle. ``out``: a (B, V) float32 buffer for the
    `log_softmax` of float32 scores (the same kernel, so the same bits), reused across steps instead of a new (B, V)
    allocation per step."""
    if out is not None and scores.dtype == torch.float32 and out.shape == scores.shape:
        logp = torch.log_softmax(scores, dim=-1, out=out)  # (B, V)
    else:
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
    """The state of one decoding loop (one `_get_logits_processor` call inside `generate`).

    Each step's reduced values are copied into step-major buffers allocated once per loop (at the first step, for
    ``capacity`` steps, doubled if `generate` runs longer), not kept as new small tensors, one set per step: a small
    allocation that lives until the end of `generate`, made right after a step freed its (B, V) temporaries, can be
    placed by glibc's allocator in the freed (B, V) hole; the hole can then no longer hold the next step's (B, V)
    tensor, the heap grows by about B·V·4 bytes every step, and the freed memory is not returned (issue 23: +5.3 GiB
    over 256 steps at V = 151,936, B = 32, while the live allocations stayed at ~0.2 GiB). The same happened with a
    view of each step's `input_ids` (kept alive by `input_ids[:, L]`). With the buffers, the only allocations that
    outlive a step are O(log T) buffer growths, and each step's float32 `log_softmax` is written into one (B, V)
    scratch buffer instead of a new (B, V) temporary (the same peak: the temporary was alive at the peak too; one
    large allocation and free fewer per step, and no fresh pages to fault in: ~20 % faster here).
    """

    def __init__(self, topk: int, capacity: int | None = None) -> None:
        self.topk = topk
        self.capacity = capacity  # steps to allocate for at the first step (None: `_DEFAULT_CAPACITY`)
        self.pending: tuple[int, torch.Tensor] | None = None  # (sequence length L, (B, V) scores sampled at L)
        self.steps = 0  # decoding steps reduced so far
        self.first_position: int | None = None  # index of the first step's token in the sequence
        self._logprobs: torch.Tensor | None = None  # (capacity, B) float32
        self._tokens: torch.Tensor | None = None  # (capacity, B) long
        self._topk_logprobs: torch.Tensor | None = None  # (capacity, B, k) float32
        self._topk_ids: torch.Tensor | None = None  # (capacity, B, k) long
        self._scratch: torch.Tensor | None = None  # (B, V) float32 log_softmax output, reused by every step

    @property
    def logprobs(self) -> torch.Tensor | tuple:
        """(steps, B) log-probs reduced so far (step-major; `()` before the first step)."""
        return () if self._logprobs is None else self._logprobs[: self.steps]

    @property
    def tokens(self) -> torch.Tensor | tuple:
        """(steps, B) tokens sampled so far (step-major; `()` before the first step)."""
        return () if self._tokens is None else self._tokens[: self.steps]

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
        if self.first_position is None:
            self.first_position = length
        elif length != self.first_position + self.steps:  # a step was skipped: keep positions exact, drop the rest
            return
        if scores.dtype == torch.float32 and (self._scratch is None or self._scratch.shape != scores.shape):
            self._scratch = torch.empty_like(scores)  # (B, V), allocated once: every step's log_softmax goes here
        tokens = input_ids[:, length]  # (B,) the token sampled from `scores`
        logp, values, ids = _reduce_step(scores, tokens, self.topk, out=self._scratch)
        self._reserve(scores.size(0), logp.device, 0 if values is None else values.size(-1))
        t = self.steps
        self._logprobs[t].copy_(logp.squeeze(-1))  # copied: the temporaries die with this step
        self._tokens[t].copy_(tokens)  # a copy, not a view that would keep this step's input_ids alive
        if values is not None:
            self._topk_logprobs[t].copy_(values)
            self._topk_ids[t].copy_(ids)
        self.steps = t + 1

    def _reserve(self, batch: int, device: torch.device, k: int) -> None:
        """Room for one more step: the buffers are allocated at the first step and doubled when full."""
        if self._logprobs is not None and self.steps < self._logprobs.size(0):
            return
        size = max(1, self.capacity or _DEFAULT_CAPACITY) if self._logprobs is None else 2 * self._logprobs.size(0)

        def grow(old: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            new = torch.empty((size, *shape), dtype=dtype, device=device)
            if old is not None:
                new[: self.steps].copy_(old[: self.steps])
            return new

        self._logprobs = grow(self._logprobs, (batch,), torch.float32)
        self._tokens = grow(self._tokens, (batch,), torch.long)
        if self.topk > 0:
            self._topk_logprobs = grow(self._topk_logprobs, (batch, k), torch.float32)
            self._topk_ids = grow(self._topk_ids, (batch, k), torch.long)

    def result(
        self, length: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(B, T_gen) log-probs and tokens and, with ``topk``, (B, T_gen, k) top-k log-probs and ids. ``length``: the
        returned sequences' length, when known; steps sampled at or beyond it are dropped."""
        keep = self.steps if length is None else max(0, min(self.steps, length - self.first_position))
        logprobs = self._logprobs[:keep].t().contiguous()  # (B, T_gen)
        tokens = self._tokens[:keep].t().contiguous()
        if self.topk <= 0:
            return logprobs, tokens, None, None
        return (
            logprobs,
            tokens,
            self._topk_logprobs[:keep].transpose(0, 1).contiguous(),
            self._topk_ids[:keep].transpose(0, 1).contiguous(),
        )


_DEFAULT_CAPACITY = 256  # steps allocated for at the first step when `generate`'s max_length is unknown
_MAX_INITIAL_CAPACITY = 4096  # cap the first allocation (a large max_new_tokens that stops early); doubled if needed


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

    def _start(self, capacity: int | None = None) -> _Run:
        self._finish()
        self._run = _Run(self.topk, capacity)
        self.num_runs += 1
        self.logprobs = self.token_ids = self.topk_logprobs = self.topk_ids = None
        self.problem = None
        return self._run

    def _finish(self, length: int | None = None) -> None:
        """Take the current run's steps. ``length``: the returned sequences' length, when known; a step sampled at a
        position at or beyond it was undone by `generate` (transformers' deferred stop check) and is dropped."""
        run, self._run = self._run, None
        if run is None or run.steps == 0:
            return
        self.logprobs, self.token_ids, topk_logprobs, topk_ids = run.result(length)
        if self.topk > 0:
            self.topk_logprobs, self.topk_ids = topk_logprobs, topk_ids


def _capacity(generation_config, prompt_length: int | None) -> int | None:
    """Steps to allocate the recorder's buffers for: the most `generate` can sample (max_length - prompt), capped."""
    max_length = getattr(generation_config, "max_length", None)
    if not isinstance(max_length, int) or not isinstance(prompt_length, int):
        return None
    return min(max(1, max_length - prompt_length), _MAX_INITIAL_CAPACITY)


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
            run = recorder._start(
                _capacity(config, kwargs.get("input_ids_seq_length", args[1] if len(args) > 1 else None))
            )
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
