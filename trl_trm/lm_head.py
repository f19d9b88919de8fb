"""π_θ at chosen token ids from the loss forward's own LM-head pass, without the (B, T, V) logits: :class:`FusedHeadCapture`.

TRL 1.16 computes the training log-probs with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that never
materialises the (B, T, V) logits and returns only per-token statistics of the sampled token. The narrowest seam is
its per-chunk helper `_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)`, looked up as a module global of `trl.trainer.utils` at every call:
for the duration of one `_get_per_token_logps_and_entropies` call it is replaced by our own
:class:`~trl_trm.head_pass.OnePassHead`, which returns the same outputs (log-probs and entropies with gradient) and,
from the same projection of each block of rows, log π_θ at the ids of every valid completion position (the rollout's
top-k and the sampled token, at the loss temperature or under the sampler's processors). One projection per block in
the forward, one recomputation in the backward, as TRL's head; no second projection. Used for `trm_exact` (:mod:`trl_trm.topk`) and
for the sampler's processors (top-k / top-p / min-p / repetition penalty, :mod:`trl_trm.processors`); a batch that
needs neither keeps TRL's head untouched.

:func:`head_logprobs_at` (the gradient-free second projection the capture used before) stays as the pure-torch
reference the tests compare against. Everything here but :class:`FusedHeadCapture` (which patches TRL) is pure
torch. Every name is also importable from :mod:`trl_trm.topk`, its former home.
"""

from __future__ import annotations

import torch

from .head_pass import VOCAB_CHUNK, HeadExtras, OnePassHead, project_rows  # noqa: F401 (VOCAB_CHUNK re-exported)
from .processors import PROCESSOR_CHUNK_ELEMENTS, SamplerProcessors, first_occurrence

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Most logits :func:`head_logprobs_at` holds at once (64 MiB in float32; the peak is about twice that)."""

_project = project_rows  # the projection both paths share (trl_trm.head_pass)


def head_logprobs_at(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    max_chunk_elements: int | None = None,
    processors: SamplerProcessors | None = None,
    first_seen: torch.Tensor | None = None,
    row_sequence: torch.Tensor | None = None,
    row_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax_v(z) at ``ids`` for z = softcap(logit_scale · (hidden @ weight.T + bias)) / temperature, the
    distribution TRL's fused LM head scores, without gradient; with ``processors``, the log-probs of the sampler's
    processed distribution instead (``processors.logprobs_at`` on z before temperature: the processors carry their
    own temperature, the generation one).

    The projection runs in ``compute_dtype`` (the autocast dtype during training, as TRL's head), the softmax in
    float32, in blocks of rows so that at most ``max_chunk_elements`` (default: the module's
    :data:`HEAD_CHUNK_ELEMENTS`, read at call time; with processors, which sort, at most
    :data:`trl_trm.processors.PROCESSOR_CHUNK_ELEMENTS`) logits exist at once.

    Args:
        hidden: (N, H) final hidden states.
        weight: (V, H) LM-head weight.
        bias: (V,) or None.
        ids: (N, K) long, < V.
        processors: the sampler's processors, or None (temperature only).
        first_seen: (S, V) long, with a repetition penalty: :func:`trl_trm.processors.first_occurrence` of the
            S sequences the rows belong to.
        row_sequence: (N,) long, with a repetition penalty: each row's sequence (index into ``first_seen``).
        row_position: (N,) long, with a repetition penalty: each row's completion position; token v is in row n's
            context iff ``first_seen[row_sequence[n], v] < row_position[n]``.

    Returns:
        (N, K) float32 log π_θ(ids | c).
    """
    n, k = ids.shape
    vocab = weight.size(0)
    out = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    if bool((ids >= vocab).any()) or bool((ids < 0).any()):
        raise ValueError(f"Rollout top-k token ids must lie in [0, {vocab}) (the LM head's vocabulary).")
    context = processors is not None and processors.uses_context
    if context and (first_seen is None or row_sequence is None or row_position is None):
        raise ValueError("A repetition penalty needs `first_seen`, `row_sequence` and `row_position`.")
    cd = compute_dtype or hidden.dtype
    budget = HEAD_CHUNK_ELEMENTS if max_chunk_elements is None else max_chunk_elements
    if processors is not None:
        budget = min(budget, PROCESSOR_CHUNK_ELEMENTS)
    rows = max(1, min(n, budget // max(vocab, 1)))
    with torch.no_grad():
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            z = _project(hidden[r0:r1].detach().to(cd), weight, bias, cd).mul_(logit_scale)  # (r, V)
            if final_logit_softcapping is not None:
                z.div_(final_logit_softcapping).tanh_().mul_(final_logit_softcapping)
            if processors is not None:
                seen = None
                if context:  # (r, V) token in the row's context
                    seen = first_seen[row_sequence[r0:r1]] < row_position[r0:r1].unsqueeze(-1)
                out[r0:r1] = processors.logprobs_at(z, ids[r0:r1], seen)  # (r, K)
                del z  # freed before the next block's logits exist
                continue
            z.mul_(1.0 / temperature)
            picked = z.gather(-1, ids[r0:r1])  # (r, K)
            top = z.amax(dim=-1, keepdim=True)  # (r, 1); log-sum-exp in place: z is not needed afterwards
            log_z = z.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)  # (r, 1)
            out[r0:r1] = picked - log_z
            del z
    return out


def _bind_head_args(
    hidden,
    weight,
    bias,
    targets,
    temperature,
    chunk_size=None,
    final_logit_softcapping=None,
    logit_scale=1.0,
    outputs=("log_probs",),
):
    return hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs


class _HeadProxy:
    """Stands in for TRL's `_ChunkedLogProbFunction` while a :class:`FusedHeadCapture` is active."""

    def __init__(self, original, capture: FusedHeadCapture) -> None:
        self.original = original
        self.capture = capture

    def apply(self, *args, **kwargs):
        return self.capture._on_call(*_bind_head_args(*args, **kwargs))


class FusedHeadCapture:
    """While active, every call of TRL's fused LM head runs :class:`~trl_trm.head_pass.OnePassHead` instead, which
    returns TRL's outputs and, from the same projection, log π_θ at ``ids`` for the completion tokens.

    Built for one `GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
    batch_size)` call, which runs the model on row chunks of ``batch_size`` (one fused-head call per chunk). Each call
    is mapped back to (row, completion position) from TRL's label layout: the head scores either every position
    (``N = rows · (L - 1)``, devices without Triton) or only the positions with a label (``N`` = number of labels,
    CUDA); the mapping is checked against the head's own targets, which must equal the sampled tokens.

    With ``processors`` (:class:`~trl_trm.processors.SamplerProcessors`), the log-probs are those of the sampler's
    processed distribution (top-k / top-p / min-p / repetition penalty, the generation temperature), the rollout's
    like: pass ``ids = completion_ids.unsqueeze(-1)`` for the sampled token only. With a repetition penalty each
    position's context (prompt tokens with attention 1, then the completion tokens before it) is built per row chunk
    from ``prompt_ids`` (:func:`~trl_trm.processors.first_occurrence`, O(rows · V)).

    Args:
        ids: (B, T, K) long ids to score per completion position (:func:`ids_with_sampled`).
        completion_ids: (B, T) the sampled tokens (alignment check).
        attention_mask: (B, L) the prompt + completion attention mask passed to the forward.
        logits_to_keep: T.
        batch_size: TRL's row chunk size (None = the whole batch).
        max_chunk_elements: most logits one block of head rows holds (None =
            :data:`trl_trm.head_pass.ONE_PASS_CHUNK_ELEMENTS`).
        processors: the sampler's processors, or None (TRL's temperature only).
        prompt_ids: (B, L - T) the left-padded prompts, needed when ``processors`` has a repetition penalty.

    After the context, :meth:`result` returns the (B, T, K) float32 log-probs (0 at padding).
    """

    def __init__(
        self,
        ids: torch.Tensor,
        completion_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        max_chunk_elements: int | None = None,
        processors: SamplerProcessors | None = None,
        prompt_ids: torch.Tensor | None = None,
    ) -> None:
        batch = ids.size(0)
        if processors is not None and processors.uses_context:
            if prompt_ids is None or prompt_ids.shape != (batch, attention_mask.size(1) - logits_to_keep):
                raise ValueError(
                    "The repetition penalty needs the (B, L - T) prompt ids of the forward's batch, got "
                    f"{None if prompt_ids is None else tuple(prompt_ids.shape)} for an attention mask of shape "
                    f"{tuple(attention_mask.shape)} and T = {logits_to_keep}."
                )
        if ids.shape[:2] != completion_ids.shape or completion_ids.size(1) != logits_to_keep:
            raise ValueError(
                f"Top-k ids {tuple(ids.shape)} do not match the completions {tuple(completion_ids.shape)} "
                f"(logits_to_keep={logits_to_keep})."
            )
        step = batch_size or batch
        self.ids = ids
        self.completion_ids = completion_ids
        self.attention_mask = attention_mask
        self.logits_to_keep = logits_to_keep
        self.chunks = [(s, min(s + step, batch)) for s in range(0, batch, step)]
        self.max_chunk_elements = max_chunk_elements
        self.processors = processors
        self.prompt_ids = prompt_ids
        self.logprobs = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)  # (B, T, K)
        self.calls = 0
        self.vocab_size: int | None = None
        self._module = None
        self._original = None
        self._gather = None

    def __enter__(self) -> FusedHeadCapture:
        import trl.trainer.utils as trl_utils

        original = getattr(trl_utils, "_ChunkedLogProbFunction", None)
        if original is None:
            raise RuntimeError(
                "trm_exact: `trl.trainer.utils._ChunkedLogProbFunction` (TRL's fused LM head) was not found; this "
                "TRL version is not supported (tested with trl 1.16)."
            )
        if isinstance(original, _HeadProxy):
            raise RuntimeError("trm_exact: nested top-k captures of the fused LM head are not supported.")
        self._module, self._original = trl_utils, original
        trl_utils._ChunkedLogProbFunction = _HeadProxy(original, self)
        return self

    def __exit__(self, *exc) -> None:
        self._module._ChunkedLogProbFunction = self._original
        self._module = self._original = None

    def _on_call(
        self, hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs=("log_probs",)
    ):
        """Stands in for one `_ChunkedLogProbFunction.apply`: TRL's outputs from :class:`OnePassHead`, whose side
        output fills this chunk's rows of :attr:`logprobs`."""
        start, stop, valid, extras = self._locate(hidden, weight, targets)
        if self._gather is None:
            import trl.trainer.utils as trl_utils

            self._gather = getattr(trl_utils, "maybe_gather_lm_head_ctx", None)  # ZeRO-3: the backward gathers again
        out = OnePassHead.apply(
            hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, tuple(outputs),
            extras, self._gather, self.max_chunk_elements,
        )  # fmt: skip
        block = self.logprobs[start:stop]  # (b, T, K) view
        block[valid.to(block.device)] = extras.values.to(block.device)
        self.vocab_size = weight.size(0)
        return out

    def _locate(self, hidden, weight, targets) -> tuple[int, int, torch.Tensor, HeadExtras]:
        """This call's row chunk [start, stop), its (b, T) completion positions the head scores, and the
        :class:`HeadExtras` (head rows, ids, processors) to evaluate there, checked against the head's targets."""
        if self.calls >= len(self.chunks):
            raise RuntimeError(
                f"trm_exact: TRL's fused LM head ran {self.calls + 1} times for {len(self.chunks)} row chunks; cannot "
                "map its hidden states to completion tokens (an unsupported TRL version or model?)."
            )
        start, stop = self.chunks[self.calls]
        self.calls += 1
        device = hidden.device
        attn = self.attention_mask[start:stop].to(device).bool()  # (b, L)
        b, length = attn.shape
        t = self.logits_to_keep
        if length - 1 - t < 0:
            raise RuntimeError(f"trm_exact: sequence length {length} too short for {t} completion tokens.")
        labelled = torch.zeros_like(attn)
        labelled[:, length - t :] = attn[:, length - t :]  # TRL's labels: completion tokens with attention 1
        labelled = labelled[:, 1:]  # (b, L - 1) shifted: position j predicts token j + 1
        n = hidden.size(0)
        if n == labelled.numel():  # every position scored (devices without Triton)
            row_of = torch.arange(n, device=device).view(b, length - 1)
        elif n == int(labelled.sum()):  # only labelled positions, in row-major order (CUDA)
            row_of = (labelled.flatten().cumsum(0) - 1).view(b, length - 1)
        else:
            raise RuntimeError(
                f"trm_exact: TRL's fused LM head scored {n} positions for a chunk of {b} rows of length {length}; "
                "expected all positions or only the completion tokens (an unsupported TRL version?)."
            )
        valid = labelled[:, length - 1 - t :]  # (b, T) completion positions the head scored
        rows = row_of[:, length - 1 - t :][valid]  # (n_valid,) ascending: row-major
        sampled = self.completion_ids[start:stop].to(device)[valid]  # (n_valid,)
        if not torch.equal(targets[rows].long(), sampled.long()):
            raise RuntimeError(
                "trm_exact: the fused LM head's targets do not match the sampled completion tokens; the top-k "
                "log-probs cannot be aligned (an unsupported TRL version?)."
            )
        ids = self.ids[start:stop].to(device)[valid]  # (n_valid, K)
        vocab = weight.size(0)
        if bool((ids >= vocab).any()) or bool((ids < 0).any()):
            raise ValueError(f"Rollout top-k token ids must lie in [0, {vocab}) (the LM head's vocabulary).")
        extras = HeadExtras(rows, ids, self.processors)
        if self.processors is not None and self.processors.uses_context:
            prompt_mask = attn[:, : length - t]  # (b, P) 0 = left padding, not context (as transformers / vLLM)
            extras.first_seen = first_occurrence(
                self.prompt_ids[start:stop].to(device), prompt_mask, self.completion_ids[start:stop].to(device), vocab
            )  # (b, V)
            extras.row_sequence, extras.row_position = valid.nonzero(as_tuple=True)  # (n_valid,) each, row-major
        return start, stop, valid, extras

    def result(self) -> torch.Tensor:
        """(B, T, K) float32 log π_θ at the ids; raises if the fused head did not run once per row chunk."""
        if self.calls != len(self.chunks):
            raise RuntimeError(
                f"trm_exact: TRL's fused LM head ran {self.calls} times for {len(self.chunks)} row chunks, so π_θ's "
                "log-probs at the rollout top-k ids are missing. The model must use TRL's fused LM head "
                "(`add_fused_lm_head`, the default of GRPOTrainer in trl 1.16)."
            )
        return self.logprobs


def two_pass_on_call(capture, hidden, weight, bias, targets, temperature, softcap, scale, outputs=("log_probs",)):
    """The capture before the one-pass head (issue 22), kept as the reference the tests and `bench_head_pass.py`
    compare against: TRL's own fused head, then a second, gradient-free projection of the rows for π_θ at the ids
    (:func:`head_logprobs_at`). A drop-in for `FusedHeadCapture._on_call`; not used in training."""
    start, stop, valid, extras = capture._locate(hidden, weight, targets)
    autocast = torch.is_autocast_enabled(hidden.device.type)
    values = head_logprobs_at(
        hidden.detach()[extras.rows], weight, bias, extras.ids, temperature=temperature,
        final_logit_softcapping=softcap, logit_scale=scale,
        compute_dtype=torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype,
        processors=extras.processors, first_seen=extras.first_seen, row_sequence=extras.row_sequence,
        row_position=extras.row_position,
    )  # fmt: skip
    capture.logprobs[start:stop][valid] = values
    capture.vocab_size = weight.size(0)
    return capture._original.apply(hidden, weight, bias, targets, temperature, 32768, softcap, scale, outputs)
