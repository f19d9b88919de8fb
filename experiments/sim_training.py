"""Training in the simulator as TRL trains (issue 17): K epochs per sampled batch, PPO's clipped ratio, the mask
re-checked against the current pi_theta at every epoch, and the library's own mask and weight functions.

One update = one batch of N sequences per run sampled from pi_roll (common random numbers: :func:`uniforms_for`),
then K epochs; in each epoch the per-token loss is TRL's ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` times the
estimator weight, with r = pi_theta / pi_old (pi_old = pi_theta at sampling) and the weight from
``estimator_weights(compute_trust_region_mask(current log pi_theta, log pi_roll, ...), log pi_old, log pi_roll)``;
PPO-clip against pi_roll (the library's bypass, ``trm_old_policy="rollout"``) puts pi_roll in r's denominator and
uses weight 1 (the rho factor is 1). Advantages are TRL's group-normalised rewards; the loss is normalised by the
batch's token count (``loss_type="dapo"``). Runs of one method (one per seed) are batched; Adam and SGD act
elementwise, so they stay independent.

Controls: ``ctrl_random`` keeps a random subset of as many sequences as ``trm`` accepted for the same seed, update and
epoch (weights as a mask mode: keep * pi_old / pi_roll); ``ctrl_count`` is ``trm`` sampling from a pool of
``POOL_FACTOR`` * N until N sequences are accepted (the advantage group and the normaliser are the sequences drawn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from trl_trm import longhorizon as lh
from trl_trm.masking import compute_trust_region_mask, estimator_weights, seq_tis_auto_log_clip

from . import sim_families as fam

EPSILON = 0.2
POOL_FACTOR = 8

# name -> (library mode, mask kwargs, role). role: "plain", "bypass", "auto" (seq_tis's automatic clip),
# "calibrated" (trm at the 90 % thresholds), "random" and "count" (the controls).
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "none": ("none", {}, "plain"),
    "ppo_roll": ("none", {}, "bypass"),
    "token_tis": ("token_tis", {}, "plain"),
    "token_mis": ("token_mis", {"ratio_min": 0.5}, "plain"),
    "seq_tis": ("seq_tis", {}, "auto"),
    "seq_mis": ("seq_mis", {}, "plain"),
    "geo_mask": ("geo_mask", {}, "plain"),
    "trm": ("trm", {}, "plain"),
    "trm_90": ("trm", {}, "calibrated"),
    "trm_exact": ("trm_exact", {"delta_avg": None}, "plain"),
    "ctrl_random": ("trm", {}, "random"),
    "ctrl_count": ("trm", {}, "count"),
}
TOKEN_LEVEL = ("none", "token_tis", "token_mis", "ppo_roll")


@dataclass
class RunSpec:
    horizon: int
    family: str
    kappa: float
    seeds: list[int]
    optimiser: str
    lr: float
    steps: int
    num_samples: int
    epochs: int
    stale_k: int = 0
    trm90: dict[str, float] = field(default_factory=dict)  # delta_max, delta_avg of trm_90


class _Optimiser:
    """Adam (default betas, eps 1e-8) or plain SGD on one tensor, elementwise (no torch.optim import)."""

    def __init__(self, param: torch.Tensor, kind: str, lr: float):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"unknown optimiser {kind!r}; choose 'adam' or 'sgd'")
        self.param, self.kind, self.lr, self.t = param, kind, lr, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        if self.kind == "sgd":
            self.param.sub_(self.lr * g)
            return
        self.t += 1
        self.m.mul_(0.9).add_(g, alpha=0.1)
        self.v.mul_(0.999).addcmul_(g, g, value=0.001)
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        self.param.sub_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))


def path_log_softmax(logits: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | s_t) along (R, n, T) paths for (R, S, V) logits, differentiable: (R, n, T)."""
    log_probs = torch.log_softmax(logits, -1)  # (R, S, V)
    R, n, T = states.shape
    flat = (states * logits.shape[-1] + tokens).reshape(R, n * T)
    return log_probs.reshape(R, -1).gather(1, flat).reshape(R, n, T)


def _weights(method: str, spec: RunSpec, lp: torch.Tensor, old: torch.Tensor, roll: torch.Tensor, kl: torch.Tensor):
    """(R, n, T) weights and (R, n) keep of one epoch, from the library's functions (per run for seq_tis's clip)."""
    mode, kwargs, role = METHODS[method]
    R, n, T = lp.shape
    kwargs = dict(kwargs, **(spec.trm90 if role == "calibrated" else {}))
    ones = torch.ones(R * n, T, dtype=torch.float64)
    denominator = roll if role == "bypass" else old
    if role == "auto":
        # The library's "auto" clip (C* >= sqrt(2): the chi2_seq estimate is floored at 0), per run of the batch.
        log_c = [seq_tis_auto_log_clip((old[r] - roll[r]).sum(-1)) for r in range(R)]
        ws, keeps = [], []
        for r in range(R):
            res = compute_trust_region_mask(lp[r], roll[r], ones[:n], mode=mode, ratio_max=math.exp(log_c[r]))
            ws.append(estimator_weights(res, old[r], roll[r], ones[:n], mode=mode, ratio_max=math.exp(log_c[r])))
            keeps.append(res.keep)
        return torch.stack(ws), torch.stack(keeps).double()
    result = compute_trust_region_mask(
        lp.reshape(-1, T), roll.reshape(-1, T), ones, mode=mode, kl_tok=kl.reshape(-1, T), **kwargs
    )
    w = estimator_weights(
        result,
        denominator.reshape(-1, T),
        roll.reshape(-1, T),
        ones,
        mode=mode,
        ratio_min=kwargs.get("ratio_min"),
        ratio_max=kwargs.get("ratio_max", 2.0),
    )
    return w.reshape(R, n, T), result.keep.double().reshape(R, n)


def _random_keep(spec: RunSpec, step: int, epoch: int, counts: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n) 0/1: a random subset of counts[r] sequences per run (seeded by seed, update, epoch)."""
    keep = torch.zeros(len(spec.seeds), n, dtype=torch.float64)
    for r, s in enumerate(spec.seeds):
        g = torch.Generator().manual_seed(7919 * s + 31 * step + epoch)
        keep[r, torch.randperm(n, generator=g)[: int(counts[r])]] = 1.0
    return keep


def _advantages(reward: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """TRL's group-normalised advantages over the used sequences of each run: (R, n)."""
    count = used.sum(-1, keepdim=True).clamp(min=1)
    mean = (reward * used).sum(-1, keepdim=True) / count
    var = ((reward - mean).square() * used).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    return (reward - mean) / (var.sqrt() + 1e-4) * used


def run_method(machine: lh.StateMachine, method: str, spec: RunSpec, trm_counts: torch.Tensor | None = None):
    """Train one method for every seed of ``spec``; return per-seed curves (tensors, (R, steps) unless stated)."""
    role = METHODS[method][2]
    R, T, N, K = len(spec.seeds), spec.horizon, spec.num_samples, spec.epochs
    param = fam.logits_for(spec.kappa, R).requires_grad_(True)
    opt = _Optimiser(param, spec.optimiser, spec.lr)
    family = fam.Family(spec.family, spec.seeds, spec.stale_k)
    n = N * POOL_FACTOR if role == "count" else N
    out = {k: torch.zeros(R, spec.steps) for k in ("j_old", "j_new", "j_roll", "accept", "zero", "visits")}
    out["counts"] = torch.zeros(R, spec.steps, K)  # accepted sequences per epoch (what ctrl_random copies)
    out["stats"] = []  # per-sequence (D_max, D_avg) at every epoch of `none` without mismatch (trm_90's calibration)
    for step in range(spec.steps):
        logits = param.detach().clone()
        probs_old = torch.softmax(logits, -1).unsqueeze(1)  # (R, 1, S, V)
        probs_roll = family.roll_probs(logits)  # (R, 1, S, V)
        states, tokens, final = fam.crn_sample(machine, probs_roll, fam.uniforms_for(spec.seeds, step, n, T))
        reward = machine.reward[final]  # (R, n)
        old = path_log_softmax(logits, states, tokens)  # (R, n, T)
        roll = lh.path_logprobs(probs_roll, states, tokens)  # (R, n, T)
        out["visits"][:, step] = sum((states == g).double() for g in fam.GATES).sum(-1).mean(-1)
        used = torch.ones(R, n, dtype=torch.float64)
        kept_any = torch.zeros(R)
        for epoch in range(K):
            param.grad = None
            lp = path_log_softmax(param, states, tokens)  # (R, n, T), differentiable
            probs_theta = torch.softmax(param.detach(), -1).unsqueeze(1)
            kl = lh.path_kl(probs_roll, probs_theta, states)  # (R, n, T) exact KL(pi_roll || pi_theta)
            with torch.no_grad():
                if role == "random":
                    keep = _random_keep(spec, step, epoch, trm_counts[:, step, epoch], n)
                    w = keep.unsqueeze(-1) * torch.exp(old - roll)
                else:
                    w, keep = _weights(method, spec, lp.detach(), old, roll, kl)
                if role == "count" and epoch == 0:  # the sequences drawn until N are accepted
                    rank = keep.cumsum(-1)  # (R, n)
                    last = torch.where(rank >= N, torch.arange(n).expand(R, n), n - 1).amin(-1)  # (R,)
                    used = (torch.arange(n).expand(R, n) <= last.unsqueeze(-1)).double()
                keep, w = keep * used, w * used.unsqueeze(-1)
                advantage = _advantages(reward, used).unsqueeze(-1)  # (R, n, 1)
                if method == "none" and spec.family == "exact":
                    out["stats"].append(_sequence_stats(lp.detach(), roll))
            out["counts"][:, step, epoch] = keep.sum(-1)
            kept_any += keep.sum(-1)
            if epoch == 0:
                out["accept"][:, step] = keep.sum(-1) / used.sum(-1)
            ref = roll if role == "bypass" else old
            ratio = torch.exp(lp - ref)  # (R, n, T)
            adv = advantage.expand_as(ratio)
            per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - EPSILON, 1 + EPSILON) * adv) * w
            loss = per_token.sum((-2, -1)) / (used.sum(-1) * T)  # (R,) dapo: divide by the batch's tokens
            loss.sum().backward()
            opt.step()
        probs_new = torch.softmax(param.detach(), -1).unsqueeze(1)
        out["j_old"][:, step] = lh.expected_reward(machine, probs_old)
        out["j_roll"][:, step] = lh.expected_reward(machine, probs_roll)
        out["j_new"][:, step] = lh.expected_reward(machine, probs_new)
        out["zero"][:, step] = (kept_any == 0).double()
    return out


def _sequence_stats(lp: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """(R n, 2) per-sequence D_max = max_t |log rho| and D_avg = mean_t k3(rho) of current pi_theta vs pi_roll."""
    log_ratio = (lp - roll).reshape(-1, lp.shape[-1])
    return torch.stack([log_ratio.abs().amax(-1), (torch.expm1(log_ratio) - log_ratio).mean(-1)], -1)


def calibrate_trm90(stats: torch.Tensor, target: float = 0.9) -> dict[str, float]:
    """trm thresholds (delta_max, delta_avg) at a common quantile level, the smallest level whose joint accept rate on
    unaffected (no-mismatch) sequences is >= target. stats: (M, 2) per-sequence (D_max, D_avg)."""
    for level in [x / 1000 for x in range(900, 1001)]:
        d_max, d_avg = (float(torch.quantile(stats[:, i], level)) for i in range(2))
        accept = float(((stats[:, 0] <= d_max) & (stats[:, 1] <= d_avg)).double().mean())
        if accept >= target:
            return {"delta_max": max(d_max, 1e-6), "delta_avg": max(d_avg, 1e-9)}
    raise AssertionError("the 1.0 quantile accepts everything")
