"""One pass of the LM head for the loss forward: :class:`OnePassHead`, a `torch.autograd.Function` of our own.

TRL's fused head returns only per-token statistics of the sampled token; `trm_exact` and sampler-aware masking also
need π_θ at other ids (the rollout's top-k) or under the sampler's processors. Rather than project the hidden states a
second time, :class:`OnePassHead` replaces TRL's head for those batches and computes everything from one projection
of each block of rows:

* the sampled tokens' log-probs at the loss temperature, with gradient (what TRL's head returns);
* the entropies, with gradient, when the caller asks for them (and TRL's other optional outputs, without gradient);
* a side output, without gradient (:class:`HeadExtras`): log π_θ at chosen ids of chosen rows, either at the loss
  temperature or, with the sampler's processors, under top-k / top-p / min-p / repetition penalty
  (:meth:`trl_trm.processors.SamplerProcessors.logprobs_at`, applied to the logits before temperature).

The backward recomputes each block's logits: nothing of size (N, V) is held between forward and backward, and at most
one block of :data:`ONE_PASS_CHUNK_ELEMENTS` float32 logits (with two or three same-sized temporaries) exists at once.
Pure torch; no TRL import (:class:`trl_trm.lm_head.FusedHeadCapture` wires it to TRL's head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .processors import PROCESSOR_CHUNK_ELEMENTS, SamplerProcessors

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""Per-token outputs besides the log-probs, in the order TRL's fused head returns them (computed only when asked)."""

ONE_PASS_CHUNK_ELEMENTS = 1 << 22
"""Most float32 logits one block of rows holds (16 MiB; the forward's peak is about twice that, the backward's three
times). Chosen from `benchmarks/bench_head_pass.py` on CPU: at V = 32,768 2^21-2^22 were the fastest and 2^24 1.2-1.6x
slower; at V = 151,936 2^22-2^26 were within the noise of each other and 2^21 or less slower; 2^22 holds 2.5x less
than 2^24 (docs/trm-exact.md, "One pass of the LM head"). Not measured on a GPU, where fewer, larger blocks may pay."""

VOCAB_CHUNK = 32768
"""Vocabulary columns per projection tile, as TRL's fused head (`_CHUNKED_LOGPROB_CHUNK_SIZE`)."""


@dataclass
class HeadExtras:
    """What :class:`OnePassHead` computes besides TRL's outputs, and where it writes it.

    Args:
        rows: (M,) long, ascending: the head rows (indices into its N hidden states) to evaluate.
        ids: (M, K) long, < V: the ids to score at each of those rows.
        processors: the sampler's processors (the log-probs are then the processed distribution's, at the
            processors' own temperature), or None (the loss temperature only).
        first_seen: (S, V) long, with a repetition penalty: token v is in row m's context iff
            ``first_seen[row_sequence[m], v] < row_position[m]``.
        row_sequence: (M,) long, with a repetition penalty: each row's sequence (index into ``first_seen``).
        row_position: (M,) long, with a repetition penalty: each row's completion position.
        values: the (M, K) float32 log-probs, written by the forward.
    """

    rows: torch.Tensor
    ids: torch.Tensor
    processors: SamplerProcessors | None = None
    first_seen: torch.Tensor | None = None
    row_sequence: torch.Tensor | None = None
    row_position: torch.Tensor | None = None
    values: torch.Tensor | None = None


def project_rows(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    """(r, V) float32 logits ``h @ weight.T + bias`` of one block of rows, projected and biased in ``cd`` (the compute
    dtype) one tile of :data:`VOCAB_CHUNK` vocabulary columns at a time, then widened: TRL's head rounds the same way."""
    vocab = weight.size(0)
    z = torch.empty(h.size(0), vocab, dtype=torch.float32, device=h.device)  # (r, V)
    if cd == torch.float32:
        torch.mm(h, weight.detach().to(cd).t(), out=z)  # a bf16/fp16 head weight under fp32 hidden states: widened
        if bias is not None:
            z += bias.detach().to(cd)
        return z
    for v0 in range(0, vocab, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, vocab)
        tile = h @ weight[v0:v1].detach().to(cd).t()  # (r, chunk) in the compute dtype, as TRL's head
        if bias is not None:
            tile += bias[v0:v1].detach().to(cd)
        z[:, v0:v1] = tile
    return z


def _scale_and_cap(z: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """In place: z ← softcap · tanh(logit_scale · z / softcap) (TRL's order of operations)."""
    z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(r,) Σ_v a[:, v] · b[:, v] of two (r, V) tensors. Through an (r, V) product and `sum`, whose blocked reduction
    keeps the float32 error small at V = 10^5 (a batched `bmm` dot product was 30x less accurate at V = 40,000)."""
    return (a * b).sum(-1)


def _row_stats(z: torch.Tensor, targets: torch.Tensor, want: dict[str, bool]) -> dict[str, torch.Tensor]:
    """Per-row statistics of the temperature-scaled logits ``z`` (r, V): log Z, the targets' log-probs and the
    optional outputs in ``want``. Shifts ``z`` in place by its row maximum (the sums then run over z - max <= 0,
    which keeps the entropy's cancellation small); ``out["log_s"]`` is log Σ exp of the shifted row."""
    out = {}
    if want["mean_logits"]:
        out["mean_logits"] = z.sum(-1) / z.size(-1)
    if want["is_top1"]:
        out["is_top1"] = z.argmax(-1) == targets  # the first maximum, as TRL's head
    top = z.amax(-1, keepdim=True)  # (r, 1)
    d = z.sub_(top)  # (r, V) shifted in place
    e = d.exp()  # (r, V)
    s = e.sum(-1)  # (r,)
    log_s = s.log()
    out["log_s"] = log_s
    out["log_z"] = top.squeeze(-1) + log_s
    out["logprobs"] = d.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_s
    if want["entropy"]:
        out["entropy"] = log_s - _dot_rows(e, d) / s
    if want["log_sum_sq_probs"]:
        out["log_sum_sq_probs"] = _dot_rows(e, e).log() - 2 * log_s
    return out


def _extras_at(z: torch.Tensor, log_z: torch.Tensor | None, extras: HeadExtras, lo: int, hi: int, r0: int) -> None:
    """Fill ``extras.values[lo:hi]`` from the block of logits ``z`` whose first row is head row ``r0``: processed
    (``log_z`` None, z before temperature) in sub-blocks that fit the processors' budget, or at temperature (z
    shifted by its row maximum, ``log_z`` the log Σ exp of the shifted row)."""
    if hi <= lo:
        return
    local = extras.rows[lo:hi] - r0  # (m,)
    proc = extras.processors
    if proc is None:
        extras.values[lo:hi] = z.index_select(0, local).gather(-1, extras.ids[lo:hi]) - log_z[local].unsqueeze(-1)
        return
    step = max(1, PROCESSOR_CHUNK_ELEMENTS // max(z.size(-1), 1))
    for s0 in range(lo, hi, step):
        s1 = min(s0 + step, hi)
        seen = None
        if proc.uses_context:  # (s, V) token in the row's context
            seen = extras.first_seen[extras.row_sequence[s0:s1]] < extras.row_position[s0:s1].unsqueeze(-1)
        block = z.index_select(0, local[s0 - lo : s1 - lo])  # (s, V)
        extras.values[s0:s1] = proc.logprobs_at(block, extras.ids[s0:s1], seen)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 ``acc``, the product accumulated in float32 (not rounded to a half dtype first)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda":
        with contextlib.suppress(TypeError, RuntimeError):  # `out_dtype` needs torch >= 2.8
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
    acc.addmm_(a.float(), b.float())


class OnePassHead(torch.autograd.Function):
    """TRL's fused-head outputs ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (None where not in
    ``outputs``) of ``hidden @ weight.T + bias`` scaled, soft-capped and divided by ``temperature``, plus
    :class:`HeadExtras` from the same projection; gradients flow to ``hidden``, ``weight`` and ``bias`` through the
    log-probs and the entropies.

    ``apply(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) long, temperature, final_logit_softcapping,
    logit_scale, outputs, extras, gather, chunk_elements)``: ``gather(weight, bias)`` is a context manager entered
    around the backward's use of the weight (TRL's ZeRO-3 gather; None = none); ``chunk_elements`` (None =
    :data:`ONE_PASS_CHUNK_ELEMENTS`) bounds the logits of one block of rows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs, extras, gather, chunk):
        ctx.set_materialize_grads(False)
        device, n, vocab = hidden.device, hidden.size(0), weight.size(0)
        cd = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        want = {name: name in outputs for name in OPTIONAL_OUTPUTS}
        rows = max(1, (chunk or ONE_PASS_CHUNK_ELEMENTS) // max(vocab, 1))
        starts = list(range(0, n, rows))
        res = {name: torch.zeros(n, dtype=torch.float32, device=device) for name in ("log_z", "logprobs")}
        res.update({name: torch.zeros(n, dtype=torch.float32, device=device) for name, w in want.items() if w})
        if want["is_top1"]:
            res["is_top1"] = torch.zeros(n, dtype=torch.bool, device=device)
        bounds = [0] * (len(starts) + 1)
        if extras is not None:
            extras.values = torch.zeros(extras.ids.shape, dtype=torch.float32, device=device)  # (M, K)
            edges = torch.tensor([*starts, n], device=extras.rows.device)
            bounds = torch.searchsorted(extras.rows, edges).tolist()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the dtypes are chosen explicitly
            for b, r0 in enumerate(starts):
                r1 = min(r0 + rows, n)
                z = _scale_and_cap(project_rows(hidden[r0:r1].detach().to(cd), weight, bias, cd), logit_scale, softcap)
                if extras is not None and extras.processors is not None:  # before temperature: the processors' own
                    _extras_at(z, None, extras, bounds[b], bounds[b + 1], r0)
                z.mul_(1.0 / temperature)  # (r, V)
                stats = _row_stats(z, targets[r0:r1], want)
                if extras is not None and extras.processors is None:
                    _extras_at(z, stats.pop("log_s"), extras, bounds[b], bounds[b + 1], r0)
                stats.pop("log_s", None)
                for name, value in stats.items():
                    res[name][r0:r1] = value
                del z, stats
        log_z, entropy = res["log_z"], res.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.args = (cd, rows, temperature, softcap, logit_scale, gather)
        frozen = [res[name] for name in ("log_sum_sq_probs", "mean_logits", "is_top1") if name in res]
        ctx.mark_non_differentiable(*frozen)
        return res["logprobs"], entropy, res.get("log_sum_sq_probs"), res.get("mean_logits"), res.get("is_top1")

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        cd, rows, temperature, softcap, logit_scale, gather = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _head_backward(
            hidden, weight, bias, targets, log_z, entropy, grad_logprobs, grad_entropy,
            (cd, rows, 1.0 / temperature, softcap, logit_scale), (need_h, need_w, need_b), gather,
        )  # fmt: skip
        return (*grads, None, None, None, None, None, None, None, None)


def _logits_grad(z, targets, log_z, entropy, g_lp, g_ent, inv_t, softcap, logit_scale) -> torch.Tensor:
    """In place on the block's raw logits ``z`` (r, V) float32: d loss / d z for upstream gradients ``g_lp`` of the
    log-probs and ``g_ent`` of the entropies ((r,) each, or None)."""
    z.mul_(logit_scale)
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()  # (r, V) kept for the chain rule
        z = t * (softcap * inv_t)
    else:
        z.mul_(inv_t)
    log_p = z.sub_(log_z.unsqueeze(-1))  # (r, V)
    p = log_p.exp()  # (r, V)
    if g_ent is not None:  # d H / d z_j = -p_j (log p_j + H)
        grad = log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-g_ent.unsqueeze(-1))
        if g_lp is not None:
            grad.addcmul_(p, g_lp.unsqueeze(-1), value=-1.0)
    else:  # d log p_target / d z_j = 1[j = target] - p_j
        grad = p.mul_(-g_lp.unsqueeze(-1))
    if g_lp is not None:
        grad.scatter_add_(-1, targets.unsqueeze(-1), g_lp.unsqueeze(-1))
    grad.mul_(inv_t)
    if t is not None:
        grad.mul_(t.square_().neg_().add_(1.0))
    return grad.mul_(logit_scale)


def _head_backward(hidden, weight, bias, targets, log_z, entropy, g_lp, g_ent, consts, needs, gather: Callable | None):
    """Gradients of (hidden, weight, bias), recomputing each block's logits; accumulated in float32 as TRL's head."""
    cd, rows, inv_t, softcap, logit_scale = consts
    need_h, need_w, need_b = needs
    g_lp = None if g_lp is None else g_lp.float()
    g_ent = None if g_ent is None else g_ent.float()
    n, vocab = hidden.size(0), weight.size(0)
    gathered = gather(weight, bias) if gather is not None else contextlib.nullcontext()
    with gathered, torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen explicitly
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if g_lp is not None or g_ent is not None:
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                h = hidden[r0:r1].detach().to(cd)  # (r, H)
                grad = _logits_grad(
                    project_rows(h, weight, bias, cd),
                    targets[r0:r1],
                    log_z[r0:r1],
                    entropy[r0:r1],
                    None if g_lp is None else g_lp[r0:r1],
                    None if g_ent is None else g_ent[r0:r1],
                    inv_t,
                    softcap,
                    logit_scale,
                )  # (r, V) fmt: skip
                for v0 in range(0, vocab, VOCAB_CHUNK):
                    v1 = min(v0 + VOCAB_CHUNK, vocab)
                    g = grad[:, v0:v1].to(cd)  # (r, chunk) as TRL's tile: in the compute dtype
                    if grad_h is not None:
                        _addmm_fp32(grad_h[r0:r1], g, weight[v0:v1].detach().to(cd))
                    if grad_w is not None:
                        _addmm_fp32(grad_w[v0:v1], g.t(), h)
                    if grad_b is not None:
                        grad_b[v0:v1] += g.sum(dim=0, dtype=torch.float32)
                del grad
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
