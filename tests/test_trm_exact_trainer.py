"""`trm_mode="trm_exact"` in TRMTrainer: top-k capture on every rollout path, alignment through TRL's batch handling,
π_θ at the stored ids from the training forward, and the exact-KL mask end to end (tiny model, vocabulary 512)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from trainer_kwargs import loss_batch
from trl import GRPOTrainer

import trl_trm.trainer as trainer_module
from trl_trm.setup_checks import setup_rollout_topk
from trl_trm.topk import FusedHeadCapture, ids_with_sampled


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _vocab(trainer) -> int:
    return trainer.model.get_output_embeddings().weight.size(0)


def _spy_kl(monkeypatch):
    """Record the `kl_tok` the trainer passes to `mask_and_weights`."""
    seen = []
    original = trainer_module.mask_and_weights

    def spy(*args, **kwargs):
        seen.append(kwargs.get("kl_tok"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "mask_and_weights", spy)
    return seen


# --------------------------------------------------------------------------- π_θ at the ids, vs brute force
def _dense_theta(trainer, prompt_ids, completion_ids, temperature):
    """(B, T, V) log π_θ from the model's full logits (what the fused head must reproduce), float32."""
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        logits = trainer.model(ids).logits[:, prompt_ids.size(1) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1)


def _hand_batch(trainer, k, temperature, noise=0.3, seed=0):
    """A batch whose rollout distribution is the model's, perturbed by `noise` in logit space (so KL > 0), with the
    rollout's top-k stored as a rollout engine would, and sampled tokens drawn at random (often outside the top-k)."""
    g = torch.Generator().manual_seed(seed)
    vocab = _vocab(trainer)
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=g)
    completion_ids = torch.randint(3, vocab, (4, 7), generator=g)
    completion_mask = torch.ones(4, 7, dtype=torch.long)
    completion_mask[1, 5:] = 0
    completion_mask[3, 2:] = 0
    log_q = _dense_theta(trainer, prompt_ids, completion_ids, temperature)  # (B, T, V)
    log_p = torch.log_softmax(log_q + noise * torch.randn(log_q.shape, generator=g), -1)  # rollout engine
    top = log_p.topk(k, dim=-1)
    batch = loss_batch(
        prompt_ids,
        completion_ids,
        completion_mask,
        log_p.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1),
        trm_topk_logprobs=top.values,
        trm_topk_ids=top.indices,
        trm_topk_mask=torch.ones_like(top.indices, dtype=torch.bool),
    )
    return batch, log_p.double(), log_q.double()


def _partition_kl(log_p, log_q, ids):
    """(B, T) KL between {each of `ids` (B, T, n), distinct} + {rest}, from the dense distributions."""
    p, q = log_p.exp(), log_q.exp()
    head = (p.gather(-1, ids) * (log_p.gather(-1, ids) - log_q.gather(-1, ids))).sum(-1)
    p_rest = (1 - p.gather(-1, ids).sum(-1)).clamp(min=0)
    q_rest = (1 - q.gather(-1, ids).sum(-1)).clamp(min=1e-300)
    return head + torch.where(p_rest > 1e-12, p_rest * (p_rest.log() - q_rest.log()), 0.0)


@pytest.mark.parametrize("compact", [False, True], ids=["all-positions", "compact"])
@pytest.mark.parametrize("k", ["V", 16])
def test_kl_from_training_forward_equals_brute_force(make_trainer, monkeypatch, k, compact):
    if compact:  # the CUDA layout of TRL's fused head (only labelled positions), forced on CPU
        import trl.trainer.utils as trl_utils

        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    trainer = make_trainer(
        bf16=False, temperature=0.7, trm_mode="trm_exact", trm_rollout_topk=16, trm_delta_kl=1.0, trm_delta_avg=None
    )
    k = _vocab(trainer) if k == "V" else k
    trainer.args.trm_rollout_topk = trainer._trm_topk = k
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch, log_p, log_q = _hand_batch(trainer, k, temperature=0.7)
    seen = _spy_kl(monkeypatch)
    loss = trainer._compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    kl = seen[-1]  # (B, T)
    valid = batch["completion_mask"].bool()
    exact = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T) brute force over the whole vocabulary
    assert float(exact[valid].min()) > 1e-3  # a real mismatch
    if k == _vocab(trainer):
        torch.testing.assert_close(kl[valid].double(), exact[valid], rtol=1e-4, atol=1e-6)
        assert _logs_metric(trainer, "trm/kl_tok_max/max") == pytest.approx(float(exact[valid].max()), rel=1e-4)
    else:
        ids = ids_with_sampled(batch["trm_topk_ids"], batch["completion_ids"])  # partition: top-k + sampled + rest
        in_top = (batch["trm_topk_ids"] == batch["completion_ids"].unsqueeze(-1)).any(-1)
        want = torch.where(in_top, _partition_kl(log_p, log_q, ids[..., :k]), _partition_kl(log_p, log_q, ids))
        torch.testing.assert_close(kl[valid].double(), want[valid], rtol=1e-4, atol=1e-6)
        assert bool((kl[valid] <= exact[valid] + 1e-6).all())  # a lower bound
        assert float((exact[valid] - kl[valid]).max()) > 1e-3  # ... and not an exact value here
        assert _logs_metric(trainer, "trm/kl_tok_max_lb/max") == pytest.approx(float(kl[valid].max()), rel=1e-5)
        assert "trm/kl_tok_max/max" not in trainer._metrics["train"]


def _logs_metric(trainer, key):
    trainer._trm_flush_window("train")  # the trm/ window is reduced when TRL logs
    return trainer._metrics["train"][key][-1]


def test_capture_over_several_row_chunks(make_trainer):
    """TRL runs the forward in row chunks (`batch_size`); each fused-head call maps back to its rows."""
    trainer = make_trainer(bf16=False, trm_mode="trm_exact", trm_rollout_topk=8)
    batch, _, _ = _hand_batch(trainer, 8, temperature=1.0)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    ids = ids_with_sampled(batch["trm_topk_ids"], batch["completion_ids"])
    results = []
    for batch_size in (None, 3, 1):
        capture = FusedHeadCapture(ids, batch["completion_ids"], attention_mask, 7, batch_size)
        with capture, torch.no_grad():
            logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, trainer.model, input_ids, attention_mask, 7, batch_size=batch_size
            )
        assert capture.calls == len(capture.chunks) == {None: 1, 3: 2, 1: 4}[batch_size]
        results.append(capture.result())
        # the last id is the sampled token: its log-prob equals TRL's own sampled-token log-prob
        valid = batch["completion_mask"].bool()
        torch.testing.assert_close(capture.result()[..., -1][valid], logps[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=1e-5)


def test_capture_refuses_an_unexpected_head_layout():
    ids = torch.zeros(2, 3, 2, dtype=torch.long)
    capture = FusedHeadCapture(ids, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 5), 3)
    with pytest.raises(RuntimeError, match="scored 5 positions"):
        capture._on_call(torch.zeros(5, 4), torch.zeros(10, 4), None, torch.zeros(5), 1.0, None, 1.0)
    with pytest.raises(RuntimeError, match="ran 0 times"):
        FusedHeadCapture(ids, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 5), 3).result()


# --------------------------------------------------------------------------- transformers path
def test_transformers_capture_full_vocabulary_is_the_processed_distribution(make_trainer, toy_dataset):
    """k = V, fp32: the captured top-k is the whole processed sampling distribution (temperature applied), equal to
    the model's full softmax; the sampled token's entry is the recorded sampling log-prob."""
    trainer = make_trainer(bf16=False, temperature=0.7, trm_mode="trm_exact", trm_rollout_topk=512)
    vocab = _vocab(trainer)
    assert vocab == 512
    trainer.model.train()
    out = trainer._generate_and_score_completions([toy_dataset[i // 4] for i in range(4)])
    topk_lp, topk_ids, topk_mask = out["trm_topk_logprobs"], out["trm_topk_ids"], out["trm_topk_mask"]
    B, T = out["completion_ids"].shape
    assert topk_lp.shape == topk_ids.shape == topk_mask.shape == (B, T, vocab)
    assert topk_lp.dtype == torch.float32 and topk_ids.dtype == torch.long and topk_mask.dtype == torch.bool
    valid = out["completion_mask"].bool()
    assert bool(topk_mask[valid].all()) and not bool(topk_mask[~valid].any())
    dense_roll = torch.full((B, T, vocab), float("nan")).scatter(-1, topk_ids, topk_lp)
    log_q = _dense_theta(trainer, out["prompt_ids"], out["completion_ids"], 0.7)
    torch.testing.assert_close(dense_roll[valid], log_q[valid], rtol=1e-4, atol=1e-4)
    sampled = topk_lp.gather(-1, (topk_ids == out["completion_ids"].unsqueeze(-1)).int().argmax(-1, keepdim=True))
    torch.testing.assert_close(sampled.squeeze(-1)[valid], out["sampling_per_token_logps"][valid], rtol=0, atol=0)
    assert bool((topk_lp[..., :-1] >= topk_lp[..., 1:]).all())  # sorted by descending probability


def test_topk_rows_stay_aligned_through_shuffle_and_split(make_trainer, toy_dataset):
    """steps_per_generation = 2: TRL shuffles the generated batch and splits it; every (B, T, k) tensor must move with
    its row. Checked by a per-row invariant: the sampled token's top-k entry equals its sampling log-prob."""
    trainer = make_trainer(
        bf16=False, trm_mode="trm_exact", trm_rollout_topk=512, steps_per_generation=2, gradient_accumulation_steps=2
    )
    trainer.model.train()
    trainer._step = 0
    generation_batch = [toy_dataset[i // 4] for i in range(8)]  # 2 prompts x 4 generations
    first = trainer._prepare_inputs(generation_batch)
    batches = trainer._buffered_inputs
    assert len(batches) == 2 and batches[0] is first
    rows = 0
    for b in batches:
        ids, lp, mask = b["trm_topk_ids"], b["trm_topk_logprobs"], b["trm_topk_mask"]
        assert ids.shape[:2] == b["completion_ids"].shape
        valid = b["completion_mask"].bool()
        hit = (ids == b["completion_ids"].unsqueeze(-1)) & mask  # (B, T, k)
        assert bool((hit.sum(-1) == 1)[valid].all())  # k = V: the sampled token is there exactly once
        at_sampled = (lp * hit).sum(-1)
        torch.testing.assert_close(at_sampled[valid], b["sampling_per_token_logps"][valid], rtol=0, atol=0)
        assert not bool(mask[~valid].any())
        rows += ids.size(0)
    assert rows == 8
    # the rows differ from each other, so a misaligned row would fail the equality above
    all_lp = torch.cat([b["sampling_per_token_logps"][:, 0] for b in batches])
    assert len(set(all_lp.tolist())) > 1


# --------------------------------------------------------------------------- end to end
def test_reject_all_freezes_parameters(make_trainer):
    # bf16 autocast training vs fp32 sampling, k = V: per-token KLs ~1e-6, above float32 noise (~1e-7) and 1e-12.
    trainer = make_trainer(trm_mode="trm_exact", trm_rollout_topk=512, trm_delta_kl=1e-12, trm_delta_avg=None)
    before = _snapshot(trainer.model)
    trainer.train()
    assert _logs(trainer, "trm/accept_rate") == [0.0, 0.0]
    assert _logs(trainer, "trm/reject_rate/delta_kl") == [1.0, 1.0]
    assert all(v > 1e-7 for v in _logs(trainer, "trm/kl_tok_max/max"))
    assert all(math.isfinite(v) for v in _logs(trainer, "loss"))
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, after[n].detach()) for n, p in before.items())


def test_generation_mask_policy_reject_all(make_trainer):
    trainer = make_trainer(
        trm_mode="trm_exact",
        trm_rollout_topk=512,
        trm_delta_kl=1e-12,
        trm_delta_avg=None,
        trm_mask_policy="generation",
        num_iterations=2,
    )
    before = _snapshot(trainer.model)
    trainer.train()
    assert _logs(trainer, "trm/accept_rate")[0] == 0.0
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, after[n].detach()) for n, p in before.items())


def test_permissive_threshold_trains_exactly_like_mode_none(make_trainer, tmp_path):
    reference = make_trainer(trm_mode="none", output_dir=tmp_path / "none")
    reference.train()
    # With the plain 0/1 mask (no pi_old / pi_roll factor) an accept-all trm_exact is exactly no correction.
    exact = make_trainer(
        trm_mode="trm_exact",
        trm_rollout_topk=512,
        trm_delta_kl=1e9,
        trm_delta_avg=None,
        trm_ratio_factor=False,
        output_dir=tmp_path / "x",
    )
    exact.train()
    assert _logs(exact, "trm/accept_rate") == [1.0, 1.0]
    assert all(v > 0 for v in _logs(exact, "trm/kl_tok_max/max"))  # k = V: exact, no `_lb` suffix
    assert _logs(exact, "loss") == _logs(reference, "loss")
    ref_params = dict(reference.model.named_parameters())
    for name, p in exact.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=0, msg=name)


def _rollout_func(topk_for, k=4):
    """Fixed completions; log-probs from a made-up engine; top-k lists from `topk_for(i, t)`."""

    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        completion_ids = [tok(" 1 2 3")["input_ids"] + [tok.eos_token_id] for _ in prompts]
        logprobs = [[-6.0] * len(c) for c in completion_ids]
        lps, ids = [], []
        for i, c in enumerate(completion_ids):
            per_pos = [topk_for(i, t, c[t]) for t in range(len(c))]
            lps.append([x[0] for x in per_pos])
            ids.append([x[1] for x in per_pos])
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "topk_logprobs": lps,
            "topk_token_ids": ids,
        }

    return rollout_func


def _uniform_topk(k):
    # k distinct ids (not the sampled token) with probability 1/600 each: a plausible, finite top-k
    return lambda i, t, sampled: ([math.log(1 / 600)] * k, [100 + j + (j >= sampled - 100) for j in range(k)])


def test_rollout_func_topk_short_lists_are_masked_and_counted(make_trainer):
    def topk_for(i, t, sampled):
        lps, ids = _uniform_topk(4)(i, t, sampled)
        return (lps[:2], ids[:2]) if (i == 0 and t == 0) else (lps, ids)  # one short position per batch

    received = {}

    def reward(completions, **kwargs):
        received.update(kwargs)
        return [float(len(c)) for c in completions]

    trainer = make_trainer(
        rollout_func=_rollout_func(topk_for),
        reward_funcs=reward,
        trm_mode="trm_exact",
        trm_rollout_topk=4,
        trm_delta_kl=1e9,
        trm_delta_avg=None,
        trm_delta_max=None,
    )
    trainer.train()
    n_tokens = len(trainer.processing_class(" 1 2 3")["input_ids"]) + 1
    assert _logs(trainer, "trm/topk_missing_frac") == [pytest.approx(1 / (4 * n_tokens))] * 2
    assert _logs(trainer, "trm/accept_rate") == [1.0, 1.0]
    assert all(math.isfinite(v) and v > 0 for v in _logs(trainer, "trm/kl_tok_max_lb/max"))
    assert "topk_logprobs" not in received and "topk_token_ids" not in received  # not forwarded to rewards


def test_rollout_func_nan_in_topk_is_rejected_and_counted(make_trainer):
    def topk_for(i, t, sampled):
        lps, ids = _uniform_topk(4)(i, t, sampled)
        return ([float("nan")] + lps[1:], ids) if (i == 1 and t == 2) else (lps, ids)

    trainer = make_trainer(
        rollout_func=_rollout_func(topk_for),
        reward_funcs=_index_reward,
        trm_mode="trm_exact",
        trm_rollout_topk=4,
        trm_delta_kl=1e9,
        trm_delta_avg=None,
    )
    trainer.train()
    assert _logs(trainer, "trm/nonfinite_frac") == [0.25, 0.25]
    assert _logs(trainer, "trm/reject_rate/nonfinite") == [0.25, 0.25]
    assert _logs(trainer, "trm/accept_rate") == [0.75, 0.75]
    assert all(math.isfinite(v) for v in _logs(trainer, "loss"))
    assert all(math.isfinite(v) and v > 0 for v in _logs(trainer, "grad_norm"))  # the other rows still train


def _index_reward(completions, **kwargs):
    """Different rewards for identical completions, so advantages (and gradients) are non-zero."""
    return [float(i) for i in range(len(completions))]


@pytest.mark.parametrize(
    ("topk_for", "match"),
    [
        (lambda i, t, s: ([-1.0] * 5, list(range(100, 105))), r"at most `trm_rollout_topk=4`"),
        (lambda i, t, s: ([-1.0, -2.0], [100, 100]), r"repeat within a position"),
    ],
)
def test_rollout_func_bad_topk_is_an_error(make_trainer, topk_for, match):
    trainer = make_trainer(rollout_func=_rollout_func(topk_for), trm_mode="trm_exact", trm_rollout_topk=4)
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_rollout_func_without_topk_is_an_error(make_trainer):
    def rollout_func(prompts, trainer):
        out = _rollout_func(_uniform_topk(4))(prompts, trainer)
        del out["topk_logprobs"], out["topk_token_ids"]
        return out

    trainer = make_trainer(rollout_func=rollout_func, trm_mode="trm_exact", trm_rollout_topk=4)
    with pytest.raises(ValueError, match=r"did not return \['topk_logprobs', 'topk_token_ids'\]"):
        trainer.train()


# --------------------------------------------------------------------------- vLLM path (fake engine)
class FakeVLLMGeneration:
    """Stands in for TRL's `VLLMGeneration`: samples with the HF model and returns what vLLM returns with
    `logprobs=k`: per position the sampled token plus the top-k, sorted by descending probability (so the sampled
    token is often not first)."""

    def __init__(self, model, temperature, max_tokens):
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.logprobs = 0  # what GRPOTrainer constructs VLLMGeneration with
        self.calls = 0

    def sync_weights(self):
        pass

    def generate(self, prompts, images=None, num_generations=1, profiler=None):
        self.calls += 1
        k = self.logprobs
        all_ids, all_lps, all_tids = [], [], []
        for prompt in prompts:
            with torch.no_grad():
                out = self.model.generate(
                    torch.tensor([prompt]),
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    max_new_tokens=self.max_tokens,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            ids = out.sequences[0, len(prompt) :].tolist()
            lps, tids = [], []
            for t, s in enumerate(ids):
                logp = torch.log_softmax(out.scores[t][0].float(), -1)
                entry = logp.topk(k).indices.tolist() if k > 0 else []
                entry = sorted(set(entry) | {s}, key=lambda i: -float(logp[i]))
                tids.append(entry)
                lps.append([float(logp[i]) for i in entry])
            all_ids.append(ids)
            all_lps.append(lps)
            all_tids.append(tids)
        return [list(p) for p in prompts], all_ids, all_lps, all_tids


def _with_fake_vllm(trainer):
    trainer.use_vllm = True
    trainer._trm_capture = False
    trainer._last_loaded_step = -1
    trainer.vllm_generation = FakeVLLMGeneration(
        trainer.model, trainer.temperature, trainer.args.max_completion_length
    )
    setup_rollout_topk(trainer)
    return trainer


def test_vllm_topk_is_requested_and_the_sampled_logprob_is_matched_by_id(make_trainer):
    trainer = _with_fake_vllm(make_trainer(bf16=False, trm_mode="trm_exact", trm_rollout_topk=3))
    assert trainer.vllm_generation.logprobs == 3
    prompt = trainer.processing_class("1+1=")["input_ids"]
    completion_ids, logprobs = trainer._generate_single_turn([prompt] * 4, None, {}, 4)
    seqs = trainer._trm_topk_stash
    assert [len(c) for c in completion_ids] == [len(lp) for lp in logprobs] == [len(s) for s in seqs]
    with torch.no_grad():
        dense = _dense_theta(trainer, torch.tensor([prompt] * 4), torch.tensor(completion_ids), trainer.temperature)
    want = dense.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(logprobs), want, rtol=1e-4, atol=1e-4)  # the sampled token's
    assert all(s.mask.all() and s.ids.shape[1] == 3 for s in seqs)
    torch.testing.assert_close(seqs[0].logprobs, dense[0].topk(3, dim=-1).values, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_vllm_path_end_to_end(make_trainer):
    """Full training through the vLLM branch of `_generate_single_turn` (fake engine, k = V, fp32 rollout vs bf16
    training): exact per-token KLs, un-suffixed metric names, a real mismatch, finite losses."""
    trainer = _with_fake_vllm(make_trainer(trm_mode="trm_exact", trm_rollout_topk=512, trm_delta_kl=1e9))
    trainer.train()
    assert trainer.vllm_generation.calls == 2
    assert _logs(trainer, "trm/accept_rate") == [1.0, 1.0]
    assert all(0 < v < 1e-3 for v in _logs(trainer, "trm/kl_tok_max/max"))
    assert _logs(trainer, "trm/topk_missing_frac") == [0.0, 0.0]


# --------------------------------------------------------------------------- start-up checks and TRL seams
def test_topk_start_up_checks(make_trainer):
    trainer = make_trainer(trm_mode="trm_exact", trm_rollout_topk=2)
    trainer.tools = [len]  # tool calling interleaves several generation turns per completion
    with pytest.raises(ValueError, match="does not support tool calling"):
        setup_rollout_topk(trainer)
    with pytest.raises(ValueError, match="continuous batching"):
        make_trainer(trm_mode="none", trm_rollout_topk=2, use_transformers_continuous_batching=True)


def test_trl_seams_used_by_the_topk_capture():
    import trl.trainer.utils as trl_utils
    from trl.generation import vllm_generation

    head = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "_ChunkedLogProbFunction.apply(" in head  # looked up as a module global at every call
    assert hasattr(trl_utils, "_ChunkedLogProbFunction")
    chunks = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert "for start in range(0, input_ids.size(0), batch_size)" in chunks
    assert "fused_lm_head=True" in chunks
    turn = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert "self.vllm_generation.generate(" in turn and "lp[0]" in turn
    engine = inspect.getsource(vllm_generation.VLLMGeneration)
    assert "self.logprobs = logprobs" in engine and engine.count('"logprobs": self.logprobs') == 2
