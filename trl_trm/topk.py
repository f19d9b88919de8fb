"""Top-k rollout log-probs for `trm_mode="trm_exact"`: capture, batch layout, and π_θ at the stored ids.

`trm_exact` bounds the per-token KL(π_roll(·|c_t) ‖ π_θ(·|c_t)), which needs more than the sampled token's
log-prob: the rollout engine's top-k distribution at every position (`trm_rollout_topk = k`).

Representation (per completion token t; the same on every rollout path)
    topk_logprobs (T_i, k) float32  log π_roll of the rollout's k most probable tokens (processed distribution:
                                    after temperature / top-k / top-p), sorted by descending probability
    topk_ids      (T_i, k) long     their token ids, distinct within a position
    topk_mask     (T_i, k) bool     False for slots the engine did not fill (a short list): ignored by the KL
The sampled token is not stored again: its rollout log-prob is `sampling_per_token_logps`, already in the batch.
In the loss it becomes a (k+1)-th outcome when it is not among the valid top-k ids (and is masked otherwise), so
the KL is computed over the partition {top-k ids} ∪ {sampled id} ∪ {rest of the vocabulary} (:func:`rollout_topk_kl`).
In the batch they travel as `trm_topk_logprobs` (B, T, k), `trm_topk_ids` (B, T, k) and `trm_topk_mask` (B, T, k),
right-padded like `completion_ids`: memory O(B·T·k), never O(B·T·V) on the rollout side.

Capture, per rollout path
* transformers `generate`: :func:`trl_trm.rollout.record_sampling_logprobs` with `topk=k` reduces each step's
  processed scores to the top-k (:func:`from_padded`).
* vLLM: `VLLMGeneration.logprobs` is set to k, so vLLM returns the sampled token plus its top-k, sorted by probability:
  TRL's `lp[0]` is then the most probable token, NOT necessarily the sampled one. :func:`from_vllm` finds the sampled
  token's log-prob by id and keeps the top-k.
* `rollout_func`: returns, besides TRL's keys, `topk_logprobs` and `topk_token_ids`, one list per completion token
  of at most k entries (:func:`from_rollout_func`). A shorter list is padded with masked slots and counted in
  `trm/topk_missing_frac`; a longer one is an error.

π_θ at the stored ids (:class:`FusedHeadCapture`): TRL 1.16 computes the training log-probs with a fused LM head
(`trl.trainer.utils.add_fused_lm_head`) that never materialises the (B, T, V) logits and returns only the sampled
token's log-prob. The narrowest seam is its per-chunk helper `_ChunkedLogProbFunction.apply(hidden, weight, bias,
targets, temperature, ...)`, looked up as a module global of `trl.trainer.utils` at every call: for the duration of
one `_get_per_token_logps_and_entropies` call it is wrapped, and each call also computes, under `no_grad` and from the
same hidden states, weight, temperature, logit scale and soft-capping, log-softmax at the k+1 ids of every valid
completion position (:func:`head_logprobs_at`, in row chunks of at most `HEAD_CHUNK_ELEMENTS` logits). No second
forward pass runs; the extra cost is one gradient-free LM-head projection of the completion tokens. The mask is
computed without gradient anyway, so the gradient of the loss is unchanged.

Sampler processors (:mod:`trl_trm.processors`, `docs/samplers.md`): the rollout's log-probs are processed (top-k /
top-p / min-p / repetition penalty). With a :class:`~trl_trm.processors.SamplerProcessors` the capture applies them
to the same projected logits, one block of rows at a time, and returns the processed log π_θ at its ids (the sampled
token alone, ``ids = completion_ids[..., None]``, or the top-k ids and the sampled token): O(B·T·(k+1)) results.

Everything here but :class:`FusedHeadCapture` (which patches TRL) is pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .masking import topk_token_kl
from .processors import PROCESSOR_CHUNK_ELEMENTS, SamplerProcessors, first_occurrence

BATCH_KEYS = ("trm_topk_logprobs", "trm_topk_ids", "trm_topk_mask")
"""Keys of the padded (B, T, k) top-k tensors in TRL's batch dict."""

ROLLOUT_FUNC_KEYS = ("topk_logprobs", "topk_token_ids")
"""Extra keys a `rollout_func` returns for `trm_exact` (removed before TRL forwards extra keys to reward functions)."""

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Most logits :func:`head_logprobs_at` holds at once (64 MiB in float32; the peak is about twice that)."""

VOCAB_CHUNK = 32768
"""Vocabulary columns per projection tile, as TRL's fused head (`_CHUNKED_LOGPROB_CHUNK_SIZE`)."""


@dataclass
class SequenceTopK:
    """One completion's rollout top-k. ``logprobs`` (T_i, k) float32, ``ids`` (T_i, k) long, ``mask`` (T_i, k)
    bool (False = slot not filled)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.size(0)


def _pad_width(t: torch.Tensor, k: int, value) -> torch.Tensor:
    if t.size(-1) >= k:
        return t[..., :k]
    pad = t.new_full((*t.shape[:-1], k - t.size(-1)), value)
    return torch.cat([t, pad], dim=-1)


def from_padded(
    topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, lengths: Sequence[int], k: int
) -> list[SequenceTopK]:
    """Per-sequence top-k from (B, T_gen, k') tensors (transformers path), cut to each completion's length.

    k' < k happens only when the vocabulary is smaller than k: those slots are masked (the ids cover the vocabulary).
    """
    out = []
    for i, n in enumerate(lengths):
        lp = topk_logprobs[i, :n].float().cpu()  # (n, k')
        ids = topk_ids[i, :n].long().cpu()  # (n, k')
        mask = torch.ones_like(ids, dtype=torch.bool)
        out.append(SequenceTopK(_pad_width(lp, k, 0.0), _pad_width(ids, k, 0), _pad_width(mask, k, False)))
    return out


def _rectangular(rows: Sequence[Sequence], width: int, fill) -> list[list]:
    return [list(r) + [fill] * (width - len(r)) for r in rows]


def from_vllm(
    completion_ids: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[Sequence[float | None]]] | None,
    logprob_token_ids: Sequence[Sequence[Sequence[int]]] | None,
    k: int,
) -> tuple[list[list[float]], list[SequenceTopK]]:
    """Sampled-token log-probs and top-k from what `VLLMGeneration.generate` returns with `logprobs=k`.

    vLLM returns, per position, the sampled token plus the top-k (k entries when the sampled token is among them,
    k + 1 otherwise), sorted by descending probability; NaN log-probs arrive as None. The sampled token's log-prob
    is found by id (it is not necessarily first); when there are more than k entries, the sampled token's entry is
    the one outside the top-k and is dropped from the top-k slots (it is represented by the sampled log-prob).

    Returns:
        (sampled log-probs, one list per completion, NaN for None; per-sequence :class:`SequenceTopK`).

    Raises:
        ValueError: no token ids, lengths that do not match the completions, or a position without the sampled token.
    """
    if logprobs is None or logprob_token_ids is None:
        raise ValueError(
            "`trm_rollout_topk` needs vLLM's per-position log-probs with their token ids, but the vLLM generation "
            "returned `logprobs`/`logprob_token_ids` = None. Check that the server or engine returns log-probs."
        )
    sampled_out: list[list[float]] = []
    topk_out: list[SequenceTopK] = []
    for i, (comp, lps, tids) in enumerate(zip(completion_ids, logprobs, logprob_token_ids, strict=True)):
        if not (len(comp) == len(lps) == len(tids)):
            raise ValueError(
                f"vLLM returned {len(lps)} log-prob lists and {len(tids)} id lists for sequence {i}, which has "
                f"{len(comp)} completion tokens: expected one per token."
            )
        n = len(comp)
        if n == 0:
            sampled_out.append([])
            topk_out.append(
                SequenceTopK(
                    torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, dtype=torch.bool)
                )
            )
            continue
        width = max(max(len(r) for r in tids), 1)
        ids = torch.tensor(_rectangular(tids, width, -1), dtype=torch.long)  # (n, W)
        lp = torch.tensor(
            [[math.nan if x is None else float(x) for x in r] for r in _rectangular(lps, width, None)],
            dtype=torch.float32,
        )  # (n, W)
        valid = ids >= 0  # (n, W)
        sampled = torch.tensor(list(comp), dtype=torch.long)  # (n,)
        match = (ids == sampled.unsqueeze(-1)) & valid  # (n, W)
        found = match.any(dim=-1)  # (n,)
        if not bool(found.all()):
            t = int((~found).nonzero()[0])
            raise ValueError(
                f"vLLM's log-probs at sequence {i}, position {t} do not include the sampled token {int(sampled[t])}: "
                "cannot tell its rollout log-prob. vLLM always returns the sampled token with `logprobs=k`; check "
                "the server version and that nothing post-processes its log-probs."
            )
        col = match.int().argmax(dim=-1)  # (n,) first (only) match
        sampled_out.append(lp.gather(-1, col.unsqueeze(-1)).squeeze(-1).tolist())
        extra = valid.sum(dim=-1) > k  # (n,) k + 1 entries: the sampled token is outside the top-k
        keep = valid & ~(match & extra.unsqueeze(-1))  # (n, W)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept entries first, in order
        ids_k = _pad_width(ids.gather(-1, order), k, 0)
        lp_k = _pad_width(lp.gather(-1, order), k, 0.0)
        mask_k = _pad_width(keep.gather(-1, order), k, False)
        topk_out.append(SequenceTopK(lp_k, ids_k.masked_fill(~mask_k, 0), mask_k))
    return sampled_out, topk_out


def from_rollout_func(
    topk_logprobs: Sequence[Sequence[Sequence[float | None]]] | None,
    topk_token_ids: Sequence[Sequence[Sequence[int]]] | None,
    completion_ids: Sequence[Sequence[int]],
    k: int,
) -> list[SequenceTopK]:
    """Per-sequence top-k from a `rollout_func`'s `topk_logprobs` / `topk_token_ids` (one list of at most k entries
    per completion token; None or NaN marks a log-prob the engine could not compute and rejects the sequence).

    A list shorter than k is padded with masked slots (counted in `trm/topk_missing_frac`); the KL then uses the
    entries given, still a lower bound. Raises ``ValueError`` for missing keys, wrong lengths or a list longer than k.
    """
    if topk_logprobs is None or topk_token_ids is None:
        raise ValueError(
            f"`trm_rollout_topk={k}` needs the rollout's top-k log-probs, but the `rollout_func` did not return "
            f"{list(ROLLOUT_FUNC_KEYS)}. Return `topk_logprobs` and `topk_token_ids`: per completion, one list of at "
            f"most {k} log-probs / token ids per completion token (e.g. vLLM `SamplingParams(logprobs={k})`), or set "
            "`trm_rollout_topk=0` with a mode other than 'trm_exact'."
        )
    if not (len(topk_logprobs) == len(topk_token_ids) == len(completion_ids)):
        raise ValueError(
            f"The `rollout_func` returned {len(topk_logprobs)} `topk_logprobs` and {len(topk_token_ids)} "
            f"`topk_token_ids` for {len(completion_ids)} completions: return one entry per completion."
        )
    out = []
    for i, (lps, tids, comp) in enumerate(zip(topk_logprobs, topk_token_ids, completion_ids, strict=True)):
        if not (len(lps) == len(tids) == len(comp)):
            raise ValueError(
                f"Rollout top-k does not match the completion: sequence {i} has {len(comp)} completion tokens but "
                f"{len(lps)} `topk_logprobs` and {len(tids)} `topk_token_ids` lists. Return one list per token."
            )
        for t, (a, b) in enumerate(zip(lps, tids, strict=True)):
            if len(a) != len(b) or len(a) > k:
                raise ValueError(
                    f"Rollout top-k at sequence {i}, position {t}: {len(a)} log-probs and {len(b)} ids. Return the "
                    f"same number of each, at most `trm_rollout_topk={k}`."
                )
        lp = torch.tensor(
            [[math.nan if x is None else float(x) for x in r] for r in _rectangular(lps, k, 0.0)], dtype=torch.float32
        ).reshape(len(comp), k)
        ids = torch.tensor(_rectangular(tids, k, 0), dtype=torch.long).reshape(len(comp), k)
        mask = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in tids], dtype=torch.bool)
        out.append(SequenceTopK(lp, ids, mask.reshape(len(comp), k)))
    return out


def check_distinct_ids(ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` when a position's valid ids repeat or are negative ((..., k) tensors): the KL needs a
    partition of the vocabulary."""
    if ids.numel() == 0:
        return
    if bool(((ids < 0) & mask).any()):
        raise ValueError("Rollout top-k token ids must be >= 0; got a negative id in a used slot.")
    k = ids.size(-1)
    sentinel = -1 - torch.arange(k, device=ids.device)  # distinct negatives for unused slots
    keyed = torch.where(mask, ids, sentinel).sort(dim=-1).values  # (..., k)
    dup = (keyed[..., 1:] == keyed[..., :-1]).any(dim=-1)  # (...)
    if bool(dup.any()):
        where = dup.nonzero()[0].tolist()
        raise ValueError(
            f"Rollout top-k token ids repeat within a position (first at index {where}): each position's ids must be "
            "distinct, e.g. vLLM's top-k. Remove duplicates before returning them."
        )


def pad_topk(seqs: Sequence[SequenceTopK], length: int, k: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-pad per-sequence top-k into the batch tensors :data:`BATCH_KEYS`, (B, length, k) each."""
    batch = len(seqs)
    logprobs = torch.zeros(batch, length, k, dtype=torch.float32)
    ids = torch.zeros(batch, length, k, dtype=torch.long)
    mask = torch.zeros(batch, length, k, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s)
        if n > length:
            raise ValueError(f"Sequence {i} has {n} top-k positions but the batch holds {length} completion tokens.")
        logprobs[i, :n], ids[i, :n], mask[i, :n] = s.logprobs, s.ids, s.mask
    check_distinct_ids(ids, mask)
    return dict(zip(BATCH_KEYS, (logprobs.to(device), ids.to(device), mask.to(device)), strict=True))


def ids_with_sampled(topk_ids: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, k + 1) ids at which π_θ is evaluated: the rollout top-k, then the sampled token."""
    return torch.cat([topk_ids, completion_ids.unsqueeze(-1).to(topk_ids.dtype)], dim=-1)


def rollout_topk_kl(
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_mask: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    completion_ids: torch.Tensor,
    theta_logprobs: torch.Tensor,
) -> torch.Tensor:
    """Per-token KL(π_roll ‖ π_θ) over {valid top-k ids} ∪ {sampled id, when not among them} ∪ {rest}.

    Args:
        topk_logprobs, topk_ids, topk_mask: (B, T, k) rollout top-k (the batch's :data:`BATCH_KEYS`).
        sampling_logprobs: (B, T) log π_roll of the sampled tokens.
        completion_ids: (B, T) the sampled tokens.
        theta_logprobs: (B, T, k + 1) log π_θ at :func:`ids_with_sampled` (top-k ids, then the sampled token).

    Returns:
        (B, T) float32 (float64 if an input is): a lower bound of the exact KL (data-processing inequality), exact
        when the valid ids cover the vocabulary; NaN where a used log-prob is NaN (see
        :func:`trl_trm.masking.topk_token_kl`).
    """
    roll, mask = rollout_topk_outcomes(topk_logprobs, topk_ids, topk_mask, sampling_logprobs, completion_ids)
    return topk_token_kl(roll, theta_logprobs, mask)


def rollout_topk_outcomes(
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_mask: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    completion_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, k + 1) log π_roll at :func:`ids_with_sampled` and the (B, T, k + 1) mask of the distinct outcomes: the
    valid top-k ids, plus the sampled id when it is not among them (the outcomes of :func:`rollout_topk_kl` and of
    the χ² lower bound :func:`trl_trm.masking.topk_token_chi2`)."""
    in_topk = ((topk_ids == completion_ids.unsqueeze(-1)) & topk_mask).any(dim=-1)  # (B, T)
    # Kept in the inputs' precision (not widened): `topk_token_kl` sizes its rounding slack from the input dtype.
    dtype = torch.promote_types(topk_logprobs.dtype, sampling_logprobs.dtype)
    roll = torch.cat([topk_logprobs.to(dtype), sampling_logprobs.to(dtype).unsqueeze(-1)], dim=-1)  # (B, T, k+1)
    mask = torch.cat([topk_mask, ~in_topk.unsqueeze(-1)], dim=-1)  # (B, T, k+1)
    return roll, mask


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
        hidden: (N, H) final hidden states. weight: (V, H). bias: (V,) or None. ids: (N, K) long, < V.
        processors: the sampler's processors, or None (temperature only).
        first_seen: (S, V) long, with a repetition penalty: :func:`trl_trm.processors.first_occurrence` of the
            S sequences the rows belong to.
        row_sequence, row_position: (N,) long, with a repetition penalty: each row's sequence (index into
            ``first_seen``) and completion position; token v is in row n's context iff
            ``first_seen[row_sequence[n], v] < row_position[n]``.

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
    inv_t = 1.0 / temperature
    with torch.no_grad():
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            h = hidden[r0:r1].detach().to(cd)  # (r, H)
            z = torch.empty(r1 - r0, vocab, dtype=torch.float32, device=hidden.device)  # (r, V)
            for v0 in range(0, vocab, VOCAB_CHUNK):
                v1 = min(v0 + VOCAB_CHUNK, vocab)
                w = weight[v0:v1].detach().to(cd).t()  # (H, chunk)
                if cd == torch.float32 and v1 - v0 == vocab:
                    torch.mm(h, w, out=z)  # one tile: straight into z
                else:
                    z[:, v0:v1] = h @ w  # (r, chunk) in the compute dtype, as TRL's head, then widened
                if bias is not None:
                    z[:, v0:v1] += bias[v0:v1].detach().to(cd).float()
            z.mul_(logit_scale)
            if final_logit_softcapping is not None:
                z.div_(final_logit_softcapping).tanh_().mul_(final_logit_softcapping)
            if processors is not None:
                seen = None
                if context:
                    first = first_seen[row_sequence[r0:r1]]  # (r, V)
                    seen = first < row_position[r0:r1].unsqueeze(-1)  # (r, V) token in the row's context
                out[r0:r1] = processors.logprobs_at(z, ids[r0:r1], seen)  # (r, K)
                del z
                continue
            z.mul_(inv_t)
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
    *rest,
    **kwargs,
):
    return hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale


class _HeadProxy:
    """Stands in for TRL's `_ChunkedLogProbFunction` while a :class:`FusedHeadCapture` is active."""

    def __init__(self, original, capture: FusedHeadCapture) -> None:
        self.original = original
        self.capture = capture

    def apply(self, *args, **kwargs):
        self.capture._on_call(*_bind_head_args(*args, **kwargs))
        return self.original.apply(*args, **kwargs)


class FusedHeadCapture:
    """While active, every call of TRL's fused LM head also computes log π_θ at ``ids`` for the completion tokens.

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

    def _on_call(self, hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale) -> None:
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
        rows = row_of[:, length - 1 - t :][valid]  # (n_valid,)
        sampled = self.completion_ids[start:stop].to(device)[valid]  # (n_valid,)
        if not torch.equal(targets[rows].long(), sampled.long()):
            raise RuntimeError(
                "trm_exact: the fused LM head's targets do not match the sampled completion tokens; the top-k "
                "log-probs cannot be aligned (an unsupported TRL version?)."
            )
        ids = self.ids[start:stop].to(device)[valid]  # (n_valid, K)
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        first_seen = row_sequence = row_position = None
        if self.processors is not None and self.processors.uses_context:
            prompt_mask = attn[:, : length - t]  # (b, P) 0 = left padding, not context (as transformers / vLLM)
            first_seen = first_occurrence(
                self.prompt_ids[start:stop].to(device),
                prompt_mask,
                self.completion_ids[start:stop].to(device),
                weight.size(0),
            )  # (b, V)
            row_sequence, row_position = valid.nonzero(as_tuple=True)  # (n_valid,) each, row-major like `rows`
        values = head_logprobs_at(
            hidden.detach()[rows],
            weight,
            bias,
            ids,
            temperature=temperature,
            final_logit_softcapping=final_logit_softcapping,
            logit_scale=logit_scale,
            compute_dtype=compute_dtype or hidden.dtype,
            max_chunk_elements=self.max_chunk_elements,
            processors=self.processors,
            first_seen=first_seen,
            row_sequence=row_sequence,
            row_position=row_position,
        )  # (n_valid, K)
        block = self.logprobs[start:stop]  # (b, T, K) view
        block[valid.to(block.device)] = values.to(block.device)
        self.vocab_size = weight.size(0)

    def result(self) -> torch.Tensor:
        """(B, T, K) float32 log π_θ at the ids; raises if the fused head did not run once per row chunk."""
        if self.calls != len(self.chunks):
            raise RuntimeError(
                f"trm_exact: TRL's fused LM head ran {self.calls} times for {len(self.chunks)} row chunks, so π_θ's "
                "log-probs at the rollout top-k ids are missing. The model must use TRL's fused LM head "
                "(`add_fused_lm_head`, the default of GRPOTrainer in trl 1.16)."
            )
        return self.logprobs
