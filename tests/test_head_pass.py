"""`trl_trm.head_pass.OnePassHead`, the LM-head pass of our own: equal to TRL's fused head (outputs and gradients) and
to the capture's former second projection (`head_logprobs_at`), in fp32 and bf16, with and without the sampler's
processors, in the trainer for every loss type and with LoRA (issue 22 items 1-2)."""

from __future__ import annotations

import pytest
import torch
from test_estimator import LOSS_TYPES
from test_trm_exact_trainer import _hand_batch
from trl.kernels import ChunkedLogProbFunction

import trl_trm.head_pass as head_pass
import trl_trm.trainer as trainer_module
from trl_trm.head_pass import HeadExtras, OnePassHead
from trl_trm.lm_head import FusedHeadCapture, head_logprobs_at, two_pass_on_call
from trl_trm.processors import SamplerProcessors, first_occurrence

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FP32 = {"rtol": 1e-6, "atol": 1e-6}


def _head(n=45, h=24, v=700, seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.6 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def _trl(hidden, weight, bias, targets, temperature, softcap, scale, outputs=ALL_OUTPUTS):
    return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, 256, softcap, scale, outputs)


def _ours(hidden, weight, bias, targets, temperature, softcap, scale, outputs=ALL_OUTPUTS, extras=None, chunk=None):
    return OnePassHead.apply(hidden, weight, bias, targets, temperature, softcap, scale, outputs, extras, None, chunk)


def _grads(out, params, seed=1):
    """Gradients of a loss that weighs the log-probs and the entropies with fixed random per-token factors."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(out[0].shape, generator=g), torch.randn(out[0].shape, generator=g)
    loss = (out[0].float() * a).sum() + (out[1].float() * b).sum()
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def _close_grads(got, want, rel):
    for x, y in zip(got, want, strict=True):
        scale = float(y.float().abs().max())
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=rel * scale)


# --------------------------------------------------------------------------- equal to TRL's fused head
def _float64(hidden, weight, bias, targets, temperature, softcap, scale):
    """(log-probs, entropies) in float64 from the dense logits: the reference both heads are rounded from."""
    z = (hidden.double() @ weight.double().t() + bias.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, -1)
    return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("chunk", [None, 700 * 7], ids=["one-block", "blocks-of-7-rows"])
def test_equals_trl_head_fp32(softcap, chunk):
    hidden, weight, bias, targets = _head()
    with torch.no_grad():
        targets[::3] = (hidden @ weight.t() + bias)[::3].argmax(-1)  # a third of the targets are the argmax
    want = _trl(hidden, weight, bias, targets, 0.7, softcap, 1.3)
    got = _ours(hidden, weight, bias, targets, 0.7, softcap, 1.3, chunk=chunk)
    assert torch.equal(got[4], want[4]) and int(want[4].sum()) >= 15  # is_top1
    # Log-probs: z_y - logsumexp(z) cancels two values of the logits' size (|z| ~ 35 here), so each float32 head errs
    # by a few ulps of |z| in absolute terms, and that error depends on the summation order of the matmul (threads,
    # blocks). Ours must agree with TRL's within twice TRL's own error against float64, and be that close to float64.
    lp64_ref, _ = _float64(hidden.detach(), weight.detach(), bias.detach(), targets, 0.7, softcap, 1.3)
    trl_err = float((want[0].double() - lp64_ref).abs().max())
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2 * trl_err + 1e-6)  # log-probs
    assert float((got[0].double() - lp64_ref).abs().max()) <= 3 * trl_err + 1e-6
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=2 * trl_err + 1e-6)  # log Σ p²: the same cancellation
    torch.testing.assert_close(got[3], want[3], **FP32)  # mean logit
    # Entropies: both heads round the same float64 value; TRL's own float32 error reaches 5e-6 here.
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-5)
    lp64, ent64 = _float64(hidden.detach(), weight.detach(), bias.detach(), targets, 0.7, softcap, 1.3)
    for heads_ent in (got[1], want[1]):
        torch.testing.assert_close(heads_ent.double(), ent64, rtol=1e-6, atol=1e-5)
    for heads_lp in (got[0], want[0]):
        torch.testing.assert_close(heads_lp.double(), lp64, rtol=5e-6, atol=1e-6)
    _close_grads(_grads(got, (hidden, weight, bias)), _grads(want, (hidden, weight, bias)), 2e-5)


def test_entropy_accurate_at_a_large_vocabulary():
    """At V = 40,000 the entropy's Σ p·z must be summed with care: a plain batched dot product was 1.8e-4 off."""
    hidden, weight, bias, targets = _head(n=64, h=64, v=40000, seed=5)
    with torch.no_grad():
        weight.mul_(0.3)
    got = _ours(hidden, weight, bias, targets, 0.7, None, 1.3)
    want = _trl(hidden, weight, bias, targets, 0.7, None, 1.3)
    lp64, ent64 = _float64(hidden.detach(), weight.detach(), bias.detach(), targets, 0.7, None, 1.3)
    for ent in (got[1], want[1]):
        torch.testing.assert_close(ent.double(), ent64, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[0].double(), lp64, rtol=5e-6, atol=1e-6)


def test_requested_outputs_only_and_no_entropy_gradient_without_entropy():
    hidden, weight, bias, targets = _head(bias=False)
    got = _ours(hidden, weight, bias, targets, 1.0, None, 1.0, outputs=("log_probs",))
    assert got[1:] == (None, None, None, None)
    want = _trl(hidden, weight, bias, targets, 1.0, None, 1.0, outputs=("log_probs",))
    torch.testing.assert_close(got[0], want[0], **FP32)
    g_got = torch.autograd.grad(got[0].sum(), [hidden, weight])
    g_want = torch.autograd.grad(want[0].sum(), [hidden, weight])
    _close_grads(g_got, g_want, 2e-5)


def test_equals_trl_head_bf16_autocast():
    hidden, weight, bias, targets = _head(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _trl(hidden, weight, bias, targets, 0.9, None, 1.0)
        got = _ours(hidden, weight, bias, targets, 0.9, None, 1.0)
    assert got[0].dtype == torch.float32  # log-softmax in float32, as TRL's head
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # same bf16 projection, float32 softmax
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    g_got, g_want = _grads(got, (hidden, weight, bias)), _grads(want, (hidden, weight, bias))
    _close_grads(g_got, g_want, 2e-2)  # bf16 tolerance: the logits' gradient is rounded to bf16 in both


# --------------------------------------------------------------------------- the side output
@pytest.mark.parametrize("k", [1, 4, 21], ids=["k=0", "k=3", "k=20"])  # top-k ids plus the sampled token
@pytest.mark.parametrize("chunk", [None, 700 * 5], ids=["one-block", "blocks-of-5-rows"])
def test_extras_equal_the_former_second_projection(k, chunk):
    hidden, weight, bias, targets = _head()
    g = torch.Generator().manual_seed(3)
    rows = torch.tensor([0, 3, 4, 5, 17, 18, 40, 44])
    ids = torch.stack([torch.randperm(700, generator=g)[:k] for _ in rows])  # (M, k)
    ids[:, -1] = targets[rows]  # the last id is the sampled token
    extras = HeadExtras(rows, ids)
    out = _ours(hidden, weight, bias, targets, 0.7, 4.0, 1.3, extras=extras, chunk=chunk)
    want = head_logprobs_at(
        hidden[rows], weight, bias, ids, temperature=0.7, final_logit_softcapping=4.0, logit_scale=1.3
    )
    torch.testing.assert_close(extras.values, want, **FP32)
    torch.testing.assert_close(extras.values[:, -1], out[0][rows], **FP32)  # the sampled token: the head's own


@pytest.mark.parametrize(
    "settings",
    [
        {"top_p": 0.9},
        {"top_k": 7, "temperature": 0.8},
        {"min_p": 0.05, "top_p": 0.95},
        {"repetition_penalty": 1.3, "top_k": 50},
    ],
    ids=["top-p", "top-k+temperature", "min-p+top-p", "repetition-penalty"],
)
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_processed_extras_equal_the_former_second_projection(settings, engine):
    hidden, weight, bias, targets = _head(n=30)
    procs = SamplerProcessors.from_settings(settings, engine=engine)
    assert procs is not None
    rows = torch.arange(10, 30)  # two sequences of 10 completion positions after 10 prompt rows
    ids = torch.stack([torch.randperm(700)[:4] for _ in rows])
    with torch.no_grad():
        ids[:, 0] = (hidden[rows] @ weight.t() + bias).argmax(-1)  # kept by every truncation here
    ids[:, -1] = targets[rows]
    extras = HeadExtras(rows, ids, procs)
    kwargs = {}
    if procs.uses_context:
        prompt = torch.randint(0, 700, (2, 6))
        completion = targets[rows].view(2, 10)
        seen = first_occurrence(prompt, torch.ones_like(prompt), completion, 700)  # (2, V)
        seq, pos = torch.arange(2).repeat_interleave(10), torch.arange(10).repeat(2)
        extras.first_seen, extras.row_sequence, extras.row_position = seen, seq, pos
        kwargs = {"first_seen": seen, "row_sequence": seq, "row_position": pos}
    _ours(hidden, weight, bias, targets, 1.0, None, 1.0, extras=extras, chunk=700 * 8)
    want = head_logprobs_at(hidden[rows], weight, bias, ids, processors=procs, **kwargs)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(extras.values), finite) and bool(finite.any())
    torch.testing.assert_close(extras.values[finite], want[finite], **FP32)
    if procs.truncates:
        assert not bool(finite.all())  # some top-k ids fall outside the processed support: a real check


def test_no_logits_tensor_outlives_the_forward():
    """What autograd keeps for the backward: the inputs and three (N,) vectors, nothing of size V per token."""
    hidden, weight, bias, targets = _head(n=64, v=2000)
    out = _ours(hidden, weight, bias, targets, 1.0, None, 1.0)
    saved = out[0].grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) <= hidden.numel() + weight.numel() + bias.numel() + 4 * 64


# --------------------------------------------------------------------------- in the trainer


def _loss_and_grads(trainer, batch, monkeypatch, legacy):
    """Loss, parameter gradients and the (B, T, k + 1) π_θ the mask read, from one `_compute_loss`."""
    seen = {}
    original = trainer_module.TRMTrainer._trm_head_result

    def spy(self, capture):
        result = original(self, capture)
        seen["theta"], seen["processed"] = result
        return result

    with monkeypatch.context() as m:
        m.setattr(trainer_module.TRMTrainer, "_trm_head_result", spy)
        if legacy:
            m.setattr(FusedHeadCapture, "_on_call", two_pass_on_call)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss = trainer._compute_loss(trainer.model, dict(batch))
        grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads, seen


def _compare_paths(trainer, batch, monkeypatch):
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss, grads, seen = _loss_and_grads(trainer, batch, monkeypatch, legacy=False)
    loss_ref, grads_ref, seen_ref = _loss_and_grads(trainer, batch, monkeypatch, legacy=True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert float(loss.abs()) > 0 and any(float(g.abs().max()) > 0 for g in grads)
    _close_grads(grads, grads_ref, 1e-5)
    for key in ("theta", "processed"):
        assert (seen[key] is None) == (seen_ref[key] is None)
        if seen[key] is not None:
            torch.testing.assert_close(seen[key], seen_ref[key], **FP32)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trainer_gradients_equal_trl_head_for_every_loss_type(make_trainer, monkeypatch, loss_type):
    trainer = make_trainer(
        bf16=False, loss_type=loss_type, temperature=0.7, trm_mode="trm_exact", trm_rollout_topk=3,
        trm_delta_kl=10.0, trm_delta_avg=None,
    )  # fmt: skip
    batch, _, _ = _hand_batch(trainer, 3, temperature=0.7)
    seen = _compare_paths(trainer, batch, monkeypatch)
    assert seen["theta"].shape[-1] == 4  # k + 1 ids scored


@pytest.mark.parametrize("k", [0, 3, 20])
def test_trainer_equal_with_and_without_processors(make_trainer, monkeypatch, k):
    overrides = {"trm_mode": "trm_exact", "trm_rollout_topk": k, "trm_delta_kl": 10.0} if k else {}
    trainer = make_trainer(bf16=False, top_p=0.9, trm_delta_avg=None, **overrides)
    batch, _, _ = _hand_batch(trainer, max(k, 1), temperature=1.0)
    if not k:
        for key in ("trm_topk_logprobs", "trm_topk_ids", "trm_topk_mask"):
            batch.pop(key)
    seen = _compare_paths(trainer, batch, monkeypatch)
    assert seen["processed"] is not None  # top-p 0.9: the mask reads the processed log-probs
    assert (seen["theta"] is None) == (k == 0)


def test_trainer_equal_with_lora(make_trainer, monkeypatch):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        peft_config=lora, bf16=False, trm_mode="trm_exact", trm_rollout_topk=3, trm_delta_kl=10.0, trm_delta_avg=None
    )
    batch, _, _ = _hand_batch(trainer, 3, temperature=1.0)
    _compare_paths(trainer, batch, monkeypatch)


def test_plain_trm_keeps_trl_head(make_trainer, monkeypatch):
    """Without a top-k or processors no capture is built: TRL's own head runs and ours never does."""
    calls = []
    monkeypatch.setattr(head_pass.OnePassHead, "apply", lambda *a, **k: calls.append(1))
    trainer = make_trainer(bf16=False, trm_delta_avg=None)
    batch, _, _ = _hand_batch(trainer, 1, temperature=1.0)
    for key in ("trm_topk_logprobs", "trm_topk_ids", "trm_topk_mask"):
        batch.pop(key)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and not calls


def test_float32_rows_with_a_half_precision_head_weight():
    """fp32 hidden states with a bf16 head weight (and bias): the weight is widened as TRL's head does, not an
    error from a dtype mismatch in `torch.mm`."""
    from trl_trm.head_pass import project_rows

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=gen)
    weight = torch.randn(40, 16, generator=gen).to(torch.bfloat16)
    bias = torch.randn(40, generator=gen).to(torch.bfloat16)
    z = project_rows(h, weight, bias, torch.float32)  # (5, 40)
    assert torch.allclose(z, h @ weight.float().t() + bias.float(), atol=1e-5)
