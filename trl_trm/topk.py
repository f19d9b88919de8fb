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

π_θ at the stored ids comes from the training forward itself (:class:`~trl_trm.lm_head.FusedHeadCapture`, which
wraps TRL's fused LM head for one call; :func:`head_capture` builds it for a batch and :func:`split_head_result`
reads it back). `head_logprobs_at`, `FusedHeadCapture`, `HEAD_CHUNK_ELEMENTS` and `VOCAB_CHUNK` live in
:mod:`trl_trm.lm_head` and are importable from here too.

The trainer's top-k plumbing (`TRMTrainer` calls each once): :func:`check_topk_setup` at start-up,
:func:`record_vllm_generate` on the vLLM path, :func:`completion_topk` when a batch is generated, :func:`topk_coverage`
for `trm/topk_missing_frac`, and :func:`topk_kl_terms` for the mask's per-token KL and χ² inputs. Everything here
but :func:`head_capture` (which builds a capture of TRL's head) is pure torch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lm_head import HEAD_CHUNK_ELEMENTS, VOCAB_CHUNK, FusedHeadCapture, head_logprobs_at
from .masking import topk_token_chi2, topk_token_kl
from .processors import SamplerProcessors

__all__ = [  # the names moved to `trl_trm.lm_head` stay importable from here
    "BATCH_KEYS",
    "HEAD_CHUNK_ELEMENTS",
    "ROLLOUT_FUNC_KEYS",
    "VOCAB_CHUNK",
    "FusedHeadCapture",
    "SequenceTopK",
    "check_distinct_ids",
    "check_topk_setup",
    "completion_topk",
    "from_padded",
    "from_rollout_func",
    "from_vllm",
    "head_capture",
    "head_logprobs_at",
    "ids_with_sampled",
    "pad_topk",
    "record_vllm_generate",
    "rollout_topk_kl",
    "rollout_topk_outcomes",
    "split_head_result",
    "topk_coverage",
    "topk_kl_terms",
]

BATCH_KEYS = ("trm_topk_logprobs", "trm_topk_ids", "trm_topk_mask")
"""Keys of the padded (B, T, k) top-k tensors in TRL's batch dict."""

ROLLOUT_FUNC_KEYS = ("topk_logprobs", "topk_token_ids")
"""Extra keys a `rollout_func` returns for `trm_exact` (removed before TRL forwards extra keys to reward functions)."""


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
        topk_logprobs: (B, T, k) rollout top-k log-probs (the batch's :data:`BATCH_KEYS`).
        topk_ids: (B, T, k) their token ids.
        topk_mask: (B, T, k) bool, False for slots the engine did not fill.
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


# --------------------------------------------------------------------------- the trainer's top-k plumbing
def check_topk_setup(k: int, continuous_batching: bool, rollout_func: bool, tools: bool) -> None:
    """Refuse, at start-up, a rollout path that cannot deliver the top-k of `trm_rollout_topk = k > 0`."""
    if continuous_batching and not rollout_func:
        raise ValueError(
            f"`trm_rollout_topk={k}` needs the rollout's top-k log-probs, which transformers continuous batching "
            "does not report. Use vLLM, plain transformers generation, or a `rollout_func` returning "
            "`topk_logprobs`/`topk_token_ids`."
        )
    if tools:
        raise ValueError(
            f"`trm_rollout_topk={k}` (trm_exact) does not support tool calling / `environment_factory` yet: "
            "multi-turn completions interleave tool tokens with several generation turns. Use `trm_mode='trm'`."
        )


@contextlib.contextmanager
def record_vllm_generate(engine: Any) -> Iterator[list[tuple]]:
    """Within the context, every `engine.generate(...)` (TRL's `VLLMGeneration`) also appends what it returned,
    `(prompt_ids, completion_ids, logprobs, logprob_token_ids, ...)`, to the yielded list. With `logprobs=k`, TRL keeps
    `lp[0]`, the most probable token's log-prob, not the sampled one's: :func:`from_vllm` reads these by id."""
    original, shadowed, returned = engine.generate, "generate" in vars(engine), []

    def generate(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    engine.generate = generate
    try:
        yield returned
    finally:
        if shadowed:
            engine.generate = original
        else:
            del engine.generate


def completion_topk(
    completion_ids: Sequence[Sequence[int]], k: int, extra: dict | None, recorded: list[SequenceTopK] | None
) -> list[SequenceTopK]:
    """A generated batch's per-sequence top-k: from a `rollout_func`'s extra keys ``extra`` (popped: TRL would forward
    them to the reward functions), else the generation turn's ``recorded`` top-k; one position per completion token."""
    if extra is not None:
        topk = from_rollout_func(
            extra.pop("topk_logprobs", None), extra.pop("topk_token_ids", None), completion_ids, k
        )
    elif recorded is None:
        raise RuntimeError("trm_rollout_topk: the generation turn recorded no top-k log-probs.")
    else:
        topk = recorded
    for i, (ids, seq) in enumerate(zip(completion_ids, topk, strict=True)):
        if len(ids) != len(seq):
            raise ValueError(
                f"Rollout top-k does not match the completion: sequence {i} has {len(ids)} completion tokens "
                f"but {len(seq)} top-k positions."
            )
    return topk


def topk_coverage(batch: dict[str, torch.Tensor], k: int, vocab: int) -> torch.Tensor:
    """(1, 2) float: [valid completion tokens whose rollout top-k has fewer than min(k, V) entries, valid tokens] of
    one batch (`trm/topk_missing_frac` is their global ratio over a logging window)."""
    valid = batch["completion_mask"].bool()  # (B, T)
    if "tool_mask" in batch:
        valid = valid & batch["tool_mask"].bool()
    short = (batch[BATCH_KEYS[2]].sum(dim=-1) < min(k, vocab)) & valid  # (B, T)
    return torch.stack([short.sum(), valid.sum()]).float().unsqueeze(0)


def head_capture(
    batch: dict[str, Any] | None,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None,
    processors: SamplerProcessors | None,
) -> FusedHeadCapture | None:
    """A capture of π_θ for the forward of ``batch``, when it carries a rollout top-k to evaluate (at the top-k ids and
    the sampled token) or the sampler has processors to reproduce (at the sampled token, or with a top-k at both, all
    under the processors: `trl_trm.processors`); None when there is nothing to capture."""
    if batch is None or "trm_weights" in batch or "sampling_per_token_logps" not in batch:
        return None
    if BATCH_KEYS[1] not in batch and processors is None:
        return None
    completion_ids = batch["completion_ids"]  # (B, T)
    if BATCH_KEYS[1] in batch:
        ids = ids_with_sampled(batch[BATCH_KEYS[1]], completion_ids)  # (B, T, k + 1)
    else:
        ids = completion_ids.unsqueeze(-1)  # (B, T, 1) the sampled token only
    prompt = batch.get("prompt_ids") if processors is not None and processors.uses_context else None  # (B, P)
    return FusedHeadCapture(
        ids, completion_ids, attention_mask, logits_to_keep, batch_size, processors=processors, prompt_ids=prompt
    )


def split_head_result(capture: FusedHeadCapture | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(theta_topk, processed_logps)`` of a finished :func:`head_capture`: (B, T, k + 1) log π_θ at the rollout top-k
    ids and the sampled token (or None), and (B, T) log π_θ of the sampled tokens under the sampler's processors (None
    when no processor beyond temperature is active: the loss forward's own log-probs are then already like with like)."""
    if capture is None:
        return None, None
    values = capture.result()  # (B, T, k + 1), or (B, T, 1) with processors and no top-k
    if capture.processors is None:
        return values, None
    # The sampled token is the last id (`ids_with_sampled`); a top-k has k >= 1 more, processed like the rollout's.
    return (values if values.size(-1) > 1 else None), values[..., -1]  # (B, T, k + 1) or None, (B, T)


def topk_kl_terms(
    batch: dict[str, torch.Tensor], theta_topk: torch.Tensor | None, mode: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(kl_tok, chi2_tok)``, (B, T) each, of a batch with a rollout top-k and ``theta_topk`` (B, T, k + 1) = log π_θ at
    its ids and the sampled token: the per-token KL(π_roll ‖ π_θ) over the outcomes of :func:`rollout_topk_outcomes`
    and its χ² lower bound. (None, None) without ``theta_topk``, which `trm_mode='trm_exact'` refuses."""
    if theta_topk is None:
        if mode == "trm_exact":
            raise ValueError(
                f"`trm_mode='trm_exact'` needs the rollout top-k in the batch ({list(BATCH_KEYS)}), which is missing: "
                "batches must come from `_generate_and_score_completions` with `trm_rollout_topk >= 1`."
            )
        return None, None
    topk_logprobs, topk_ids, topk_mask = (batch[key] for key in BATCH_KEYS)
    roll_k, outcomes = rollout_topk_outcomes(
        topk_logprobs, topk_ids, topk_mask, batch["sampling_per_token_logps"], batch["completion_ids"]
    )  # (B, T, k + 1) each
    return topk_token_kl(roll_k, theta_topk, outcomes), topk_token_chi2(roll_k, theta_topk, outcomes)  # (B, T) each
