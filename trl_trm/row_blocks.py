"""The CPU row-block loop of :func:`~trl_trm.masks.compute_trust_region_mask`: the per-sequence statistics and the
pre-``keep`` weights of a batch, written in place one block of rows at a time (pure torch, no TRL import).

Seams: the loop looks up :data:`_CPU_BLOCK_THREADS` and :func:`_fill_row_block` in this module at call time, so a test
or a benchmark that changes either patches ``trl_trm.row_blocks`` (not the ``trl_trm.masking`` facade).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Row blocks of `compute_trust_region_mask` on CPU: about 2**17 elements (512 KiB of float32 per (rows, T) scratch
# tensor), so a block's scratch tensors stay in a 2 MiB L2 cache between the ~12 elementwise passes and reductions,
# and the temporaries are bounded by a block instead of the whole batch. Measured here (2 cores): 2**17 was the
# fastest of 2**14 ... 2**18 at (256, 8192) and (512, 16384); smaller blocks pay more per-op overhead.
_CPU_BLOCK_ELEMENTS = 1 << 17

# Torch intra-op threads of the CPU block loop (None: the caller's setting). Each block is ~12 small kernels; with
# several threads each one is a fork/join of the OpenMP team, and when another process holds one of the cores every
# join waits for a descheduled thread. Measured here (interleaved, (512, 16384)) with one competing busy process:
# 389 ms on 1 thread against 579 ms on 2; under heavy load 12.6 s against 29.7 s; two Python threads of one torch
# thread each were slower still (they wait for the GIL instead). The price: 1.25x on an idle machine (218 against
# 175 ms; benchmarks/README.md, section 5).
# Results are bit-identical for any thread count: every op is elementwise or a per-row reduction over a block of
# >= 2 rows, which torch does not split across threads.
_CPU_BLOCK_THREADS: int | None = 1


def _row_blocks(batch: int, length: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering the batch. Every statistic is per row, so blocks are exact.

    On CPU, blocks of about ``_CPU_BLOCK_ELEMENTS`` elements (at least 2 rows); on other devices one block (fewer
    kernel launches; the accelerator's memory bandwidth is the bottleneck, not its cache). A batch of several rows is
    never cut into a 1-row block: torch splits a single-row reduction across threads (another summation order), so
    its sums would not be bit-identical to the same row reduced inside a larger batch.
    """
    if batch == 0:
        return []
    rows = batch if device.type != "cpu" else max(2, _CPU_BLOCK_ELEMENTS // max(length, 1))
    starts = list(range(0, batch, rows))
    if len(starts) > 1 and batch - starts[-1] == 1:
        starts.pop()  # merge a trailing 1-row block into the previous one
    return list(zip(starts, starts[1:] + [batch], strict=True))


@dataclass
class _BlockStats:
    """Per-sequence outputs that the row blocks of `compute_trust_region_mask` write into, (B,) each."""

    length: torch.Tensor  # long
    num_finite: torch.Tensor  # long
    seq_log_ratio: torch.Tensor  # sum_t log rho_t
    log_ratio_abs_max: torch.Tensor  # max_t |log rho_t|
    k3_sum: torch.Tensor  # sum_t k3(rho_t)
    k3_max: torch.Tensor  # max_t k3(rho_t)
    token_weight_sum: torch.Tensor  # sum_t weights[i, t]
    kl_tok_max: torch.Tensor | None
    kl_tok_sum: torch.Tensor | None
    chi2_sum: torch.Tensor  # float64 sum_t (rho_t - 1)^2
    ratio_m1_sum: torch.Tensor  # float64 sum_t (rho_t - 1)
    chi2_tok_sum: torch.Tensor | None  # float64 sum_t chi2_tok

    @classmethod
    def empty(
        cls, batch: int, dtype: torch.dtype, device: torch.device, with_kl: bool, with_chi2_tok: bool = False
    ) -> _BlockStats:
        def new(kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(batch, dtype=kind, device=device)  # zeros: the max of an empty row (T = 0) is 0

        kl_max, kl_sum = (new(), new()) if with_kl else (None, None)
        f64 = torch.float64
        chi2_tok = new(f64) if with_chi2_tok else None
        return cls(
            new(torch.long),
            new(torch.long),
            new(),
            new(),
            new(),
            new(),
            new(),
            kl_max,
            kl_sum,
            new(f64),
            new(f64),
            chi2_tok,
        )


def _fill_block_weights(
    w: torch.Tensor,
    lr: torch.Tensor,
    pad: torch.Tensor | None,
    valid: torch.Tensor | None,
    stats: _BlockStats,
    s: slice,
    mode: str,
    band: tuple[float | None, float | None],
) -> None:
    """The pre-``keep`` weights of one row block, written into ``w`` (n, T) (a slice of the returned weights), and
    their row sums; ``lr`` (n, T) is log rho (0 off the valid set). The padding comes either as ``valid`` (n, T), 1.0
    on completion tokens and 0.0 on padding in the working dtype (the fast pass; in the sequence-mask modes it *is*
    ``w``), or as ``pad`` (n, T) bool, True on padding (the finiteness-checking pass)."""
    n, length = w.shape
    lo, hi = band
    if mode == "token_tis":
        torch.clamp(lr, min=lo, max=hi, out=w).exp_()  # rho_t truncated to the band (1 on padding, where lr = 0)
    elif mode == "token_mis":
        torch.eq(torch.clamp(lr, min=lo, max=hi, out=w), lr, out=w)  # 1 inside the band [lo, hi], else 0
    elif mode == "seq_tis":
        seq_w = torch.exp(stats.seq_log_ratio[s].clamp(min=lo, max=hi))  # (n,)
        w.copy_(seq_w.unsqueeze(-1).expand(n, length))
        if valid is not None and not bool(torch.isfinite(seq_w).all()):  # inf * 0 would put NaN on the padding
            pad, valid = torch.eq(valid, 0), None
    if mode in ("token_tis", "token_mis", "seq_tis"):
        if valid is not None:
            w.mul_(valid)  # exact: x * 1 = x, and w is finite at every padding position here
        else:
            w.masked_fill_(pad, 0.0)
    elif valid is None:  # sequence masks and `none`: the completion mask, zeroed afterwards on rejected rows
        torch.logical_not(pad, out=w)
    elif valid.data_ptr() != w.data_ptr():
        w.copy_(valid)
    torch.sum(w, dim=-1, out=stats.token_weight_sum[s])


def _block_log_ratio(theta_b: torch.Tensor, roll_b: torch.Tensor, lr: torch.Tensor, work: torch.Tensor) -> None:
    """``lr`` (n, T) = theta_b - roll_b in the working dtype of ``lr``."""
    if torch.result_type(theta_b, roll_b) == lr.dtype:  # the subtraction runs in the working dtype
        torch.sub(theta_b, roll_b, out=lr)
    else:  # both inputs narrower (bf16/fp16): widen both first, as `.to(dtype)` would (`lr.sub_(roll_b)` would
        lr.copy_(theta_b)  # allocate an (n, T) widened copy of roll_b; the scratch `work` is free at this point)
        lr.sub_(work.copy_(roll_b))


def _block_valid_set(
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    lr: torch.Tensor,
    work: torch.Tensor,
    pad: torch.Tensor,
    valid: torch.Tensor,
    stats: _BlockStats,
    s: slice,
    check_finite: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """T_i and the finite counts of rows ``s``, and ``lr`` zeroed off the valid set. Returns ``(valid, None)`` in
    the fast pass (``check_finite=False``) and ``(None, invalid)`` in the checking pass, ``invalid`` (n, T) True off
    the valid set (which also leaves ``pad`` (n, T) True on padding).

    Fast pass: ``valid`` = [completion_mask != 0] as 0.0/1.0 in the working dtype; ``lr *= valid`` gives exactly
    ``lr`` on valid tokens and a zero (possibly -0.0, which every sum, max and exp treats as 0) on padding. A NaN or
    inf on the padding survives the product, makes the row's sums non-finite, and sends the row to the checking pass,
    which selects it away exactly (``masked_fill``), as the module's contract says."""
    length = lr.size(1)
    if not check_finite:
        torch.ne(completion_mask[s], 0, out=pad)  # (n, T) bool, True on completion tokens (reused as scratch)
        valid.copy_(pad.view(torch.uint8))  # 1.0 / 0.0 (a uint8 source converts ~5x faster than a bool one here)
        if length < 2**24:  # float counts are exact below 2**24
            torch.sum(valid, dim=-1, out=stats.k3_sum[s])  # k3_sum as (n,) scratch
            stats.length[s].copy_(stats.k3_sum[s])  # T_i
        else:
            torch.sum(torch.ne(completion_mask[s], 0), dim=-1, out=stats.length[s])
        stats.num_finite[s].copy_(stats.length[s])
        lr.mul_(valid)
        return valid, None
    torch.eq(completion_mask[s], 0, out=pad)  # (n, T) True on padding
    torch.sum(pad, dim=-1, out=stats.length[s])
    stats.length[s].neg_().add_(length)  # T_i = T - padding
    invalid = ~torch.isfinite(lr)  # (n, T)
    if kl is not None:
        work.copy_(kl[s])  # kl in the working dtype: a float64 value can overflow float32
        invalid |= ~torch.isfinite(work)
    invalid |= pad
    torch.sum(invalid, dim=-1, out=stats.num_finite[s])
    stats.num_finite[s].neg_().add_(length)
    lr.masked_fill_(invalid, 0.0)  # exact zeros off the valid set
    return None, invalid


def _fill_row_block(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    start: int,
    stop: int,
    stats: _BlockStats,
    weights: torch.Tensor,
    scratch: tuple[torch.Tensor, ...],
    mode: str,
    band: tuple[float | None, float | None],
    chi2_tok: torch.Tensor | None,
    check_finite: bool,
) -> None:
    """Statistics and pre-``keep`` weights of rows [start, stop) of `compute_trust_region_mask`, written in place.

    ``check_finite=False`` assumes every valid log-prob (and ``kl``) and every padding value is finite: the valid set
    is then the completion mask. The caller detects rows where that was wrong (their sums are non-finite) and calls
    again with ``True``, which excludes non-finite tokens exactly as the formulas say. Rejected rows' weights are
    zeroed by the caller. Every statistic, including the variance sums (chi^2, surrogate terms, ``chi2_tok``, in
    float64), is accumulated here, in one pass over the block; the caller redoes a row in float64 elementwise only
    where the working dtype overflowed.
    """
    n = stop - start
    lr, work, pad, wide, valid_scratch = (t[:n] for t in scratch)  # (n, T) views of the scratch tensors
    s = slice(start, stop)
    _block_log_ratio(theta[s], roll[s], lr, work)
    w = weights[s]
    valid = w if mode not in ("token_tis", "token_mis", "seq_tis") else valid_scratch  # mask modes: weights = valid
    valid, invalid = _block_valid_set(completion_mask, kl, lr, work, pad, valid, stats, s, check_finite)

    torch.sum(lr, dim=-1, out=stats.seq_log_ratio[s])
    if lr.size(1) > 0:  # the max of an empty row stays 0
        torch.amax(torch.abs(lr, out=work), dim=-1, out=stats.log_ratio_abs_max[s])
    torch.expm1(lr, out=work)  # (n, T) rho_t - 1, exactly 0 off the valid set
    torch.sum(wide.copy_(work), dim=-1, out=stats.ratio_m1_sum[s])  # in float64 (one widening, no allocation)
    torch.sum(wide.square_(), dim=-1, out=stats.chi2_sum[s])  # (rho_t - 1)^2 in float64: finite for finite rho_t
    work.sub_(lr)  # (n, T) k3, exactly 0 where lr == 0
    torch.sum(work, dim=-1, out=stats.k3_sum[s])
    if lr.size(1) > 0:
        torch.amax(work, dim=-1, out=stats.k3_max[s])
    if kl is not None:
        work.copy_(kl[s])  # (n, T)
        if valid is not None:
            work.mul_(valid)
        else:
            work.masked_fill_(invalid, 0.0)
        torch.sum(work, dim=-1, out=stats.kl_tok_sum[s])
        if lr.size(1) > 0:
            torch.amax(work, dim=-1, out=stats.kl_tok_max[s])
    if chi2_tok is not None:  # in its own dtype (float64 values may overflow float32), summed in float64
        off = torch.eq(valid, 0) if valid is not None else invalid
        torch.sum(chi2_tok[s].masked_fill(off, 0.0), dim=-1, dtype=torch.float64, out=stats.chi2_tok_sum[s])

    _fill_block_weights(w, lr, None if valid is not None else pad, valid, stats, s, mode, band)


@contextlib.contextmanager
def one_block_thread(device: torch.device, batch: int) -> Iterator[None]:
    """Run the enclosed block loop on ``_CPU_BLOCK_THREADS`` torch threads on CPU, restoring the caller's setting
    afterwards (also on an error), except for a single row: torch would split its reductions across the caller's
    threads, and a 1-row batch keeps the summation order it always had."""
    threads_before = torch.get_num_threads()
    one_thread = _CPU_BLOCK_THREADS is not None and device.type == "cpu" and batch >= 2
    if one_thread:
        torch.set_num_threads(_CPU_BLOCK_THREADS)
    try:
        yield
    finally:
        if one_thread:
            torch.set_num_threads(threads_before)


def fill_row_blocks(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    stats: _BlockStats,
    weights: torch.Tensor,
    mode: str,
    band: tuple[float | None, float | None],
    chi2_tok: torch.Tensor | None = None,
) -> None:
    """Fill ``stats`` (B,) and the pre-``keep`` ``weights`` (B, T) of every row, block by block, in the dtype of
    ``weights``: a fast pass that assumes every valid log-prob (and ``kl``) is finite, then the per-token finiteness
    check on the row blocks whose sums came out non-finite (rare)."""
    batch, length_t = completion_mask.shape
    device, dtype = weights.device, weights.dtype
    blocks = _row_blocks(batch, length_t, device)
    rows = max((stop - start for start, stop in blocks), default=0)
    scratch = (
        torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) log-ratios
        torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) k3, |log rho|, kl_tok
        torch.empty(rows, length_t, dtype=torch.bool, device=device),  # (rows, T) padding
        torch.empty(rows, length_t, dtype=torch.float64, device=device),  # (rows, T) rho_t - 1, then its square
        torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) 1.0 on valid tokens (token/TIS modes)
    )

    def fill(start: int, stop: int, check_finite: bool) -> None:
        _fill_row_block(
            theta, roll, completion_mask, kl, start, stop, stats, weights, scratch, mode, band, chi2_tok, check_finite
        )

    # Fast pass: assumes every valid log-prob (and kl_tok) is finite, so the valid set is the completion mask.
    for start, stop in blocks:
        fill(start, stop, check_finite=False)
    # A non-finite value at a valid position makes its row's sum non-finite: recompute those row blocks with the
    # per-token finiteness check (rare; a finite row that merely overflowed is recomputed too, harmlessly).
    row_sums = stats.seq_log_ratio if kl is None else stats.seq_log_ratio + stats.kl_tok_sum  # (B,)
    bad_rows = (~torch.isfinite(row_sums)).nonzero().flatten().tolist()
    if bad_rows:
        bad_rows = set(bad_rows)
        for start, stop in blocks:
            if any(start <= i < stop for i in bad_rows):
                fill(start, stop, check_finite=True)
