"""`trl_trm.processors`: the sampler's processors reproduced on logits, against transformers' own LogitsProcessor
classes, vLLM's order, real `generate` scores, the chunked head, and the start-up refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trl_trm.processors import SamplerProcessors, context_mask, first_occurrence
from trl_trm.rollout import processed_logprobs
from trl_trm.topk import head_logprobs_at

SETTINGS = {
    "top_k": dict(top_k=20),
    "top_p": dict(top_p=0.9),
    "min_p": dict(temperature=0.1, min_p=0.1),  # the tiny model's logits are near-flat: min-p cuts only when sharpened
    "repetition_penalty": dict(repetition_penalty=1.2),
    "combined": dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
}


def _transformers_list(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, prompt_pad=None):
    """transformers' processors in `generate`'s order (`GenerationMixin._get_logits_processor`)."""
    out = LogitsProcessorList()
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=prompt_pad))
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p:
        out.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    return out


def _random_case(seed=0, n=6, vocab=97, context=11, pad=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3.0
    logits[0, :5] = logits[0, 5]  # ties at the top-k / top-p boundaries
    logits[1, 10:40] = 0.0  # exact zeros under the repetition penalty
    context_ids = torch.randint(0, vocab, (n, context), generator=g)
    context_ids[:, :pad] = 0  # left padding (token 0), excluded from the context
    prompt_pad = torch.tensor([pad] * (n // 2) + [0] * (n - n // 2))
    context_ids[n // 2 :, :pad] = torch.randint(1, vocab, (n - n // 2, pad), generator=g)
    return logits, context_ids, prompt_pad


@pytest.mark.parametrize("name", list(SETTINGS))
def test_transformers_order_matches_transformers_processors_bit_for_bit(name):
    settings = SETTINGS[name]
    for seed in range(5):
        logits, context_ids, prompt_pad = _random_case(seed)
        reference = _transformers_list(**settings, prompt_pad=prompt_pad)(context_ids, logits.clone())  # (N, V)
        valid = torch.arange(context_ids.size(1)).unsqueeze(0) >= prompt_pad.unsqueeze(1)  # (N, C)
        seen = context_mask(context_ids, logits.size(1), valid)
        processed = SamplerProcessors(engine="transformers", **settings).process(logits, seen)
        assert torch.equal(processed, reference), name
        assert torch.isinf(processed).any() == (name != "repetition_penalty")
        ids = torch.arange(logits.size(1)).expand_as(logits)
        lp = SamplerProcessors(engine="transformers", **settings).logprobs_at(logits, ids, seen)
        assert torch.equal(lp, torch.log_softmax(reference, dim=-1))


def _vllm_reference(logits, seen, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """vLLM v1's Sampler, written out step by step (penalties, temperature, min-p, top-k + top-p on sorted logits)."""
    z = logits.clone()
    if repetition_penalty != 1.0:
        z = torch.where(seen, torch.where(z > 0, z / repetition_penalty, z * repetition_penalty), z)
    z = z / temperature
    if min_p > 0:
        probs = z.softmax(-1)
        z[probs < probs.max(-1, keepdim=True).values * min_p] = -math.inf
    order = z.argsort(-1, descending=True)
    out = torch.full_like(z, -math.inf)
    for row in range(z.size(0)):
        vals = z[row, order[row]]
        keep = torch.isfinite(vals)
        if top_k:
            keep &= vals >= vals[top_k - 1]
        vals = vals.masked_fill(~keep, -math.inf)
        if top_p < 1.0:
            probs = vals.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass strictly more probable than each token
            keep &= (1 - before) > 1 - top_p + 1e-6
            keep[0] = True
        out[row, order[row][keep]] = z[row, order[row][keep]]
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_vllm_order_matches_a_step_by_step_reference(name):
    settings = SETTINGS[name]
    for seed in range(5):
        logits, context_ids, _ = _random_case(seed)
        logits[0, :5] = torch.arange(5.0)  # no exact ties: the reference sorts differently among ties
        seen = context_mask(context_ids, logits.size(1))
        processed = SamplerProcessors(engine="vllm", **settings).process(logits, seen)
        reference = _vllm_reference(logits, seen, **settings)
        assert torch.equal(torch.isinf(processed), torch.isinf(reference)), name
        torch.testing.assert_close(processed[torch.isfinite(processed)], reference[torch.isfinite(reference)])


def test_vllm_min_p_before_top_p_differs_from_transformers():
    # p = [0.4, 0.3, 0.2, 0.1], top_p = 0.75, min_p = 0.3. transformers (top-p, then min-p): top-p drops 0.1 (the
    # lower 0.1 <= 0.25), min-p's threshold 0.3 * 0.4/0.9 = 0.13 keeps 0.2/0.9: three tokens. vLLM (min-p, then top-p):
    # min-p drops 0.1 (< 0.12), top-p on the renormalised [0.44, 0.33, 0.22] drops 0.22 (<= 0.25): two tokens.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    transformers_kept = torch.isfinite(SamplerProcessors("transformers", top_p=0.75, min_p=0.3).process(logits))
    vllm_kept = torch.isfinite(SamplerProcessors("vllm", top_p=0.75, min_p=0.3).process(logits))
    assert transformers_kept.tolist() == [[True, True, True, False]]
    assert vllm_kept.tolist() == [[True, True, False, False]]


def test_first_occurrence_is_the_context_of_every_position():
    vocab = 13
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 5]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completion = torch.tensor([[1, 5, 2, 1, 3], [3, 3, 4, 12, 0]])
    first = first_occurrence(prompt, prompt_mask, completion, vocab)  # (B, V)
    for b in range(2):
        for t in range(completion.size(1)):
            context = prompt[b][prompt_mask[b].bool()].tolist() + completion[b, :t].tolist()
            expected = torch.zeros(vocab, dtype=torch.bool)
            expected[context] = True
            assert torch.equal(first[b] < t, expected), (b, t)
    assert first[0, 0] == completion.size(1)  # left padding (token 0) is not context


def test_head_logprobs_with_processors_are_chunked_and_equal_the_full_computation():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(50, 8, generator=g)
    ids = torch.randint(0, 50, (9, 3), generator=g)
    first = torch.randint(-1, 5, (2, 50), generator=g)
    seq, pos = torch.tensor([0] * 5 + [1] * 4), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    proc = SamplerProcessors("transformers", temperature=0.8, top_k=7, top_p=0.9, repetition_penalty=1.5)
    chunked = head_logprobs_at(
        hidden, weight, None, ids, processors=proc, first_seen=first, row_sequence=seq, row_position=pos,
        max_chunk_elements=100,
    )  # fmt: skip
    seen = first[seq] < pos.unsqueeze(-1)
    full = proc.logprobs_at(hidden @ weight.t(), ids, seen)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    assert torch.isinf(chunked).any() and torch.isfinite(chunked).any()
    with pytest.raises(ValueError, match="repetition penalty needs"):
        head_logprobs_at(hidden, weight, None, ids, processors=proc)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_reproduces_real_generate_scores(tiny_model_dir, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    settings = SETTINGS[name]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    enc = tok(["1+2=", "the a of to and 33+", "ab"], return_tensors="pt", padding=True)
    out = model.generate(
        **enc, do_sample=True, max_new_tokens=10, output_scores=True, return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id, **{"top_k": 0, **settings},  # top_k=0: transformers' global default is 50
    )  # fmt: skip
    rollout, _, _ = processed_logprobs(out.scores, out.sequences)  # (B, T)
    prompt_len = enc["input_ids"].size(1)
    completion = out.sequences[:, prompt_len:]  # (B, T)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(completion)], dim=1)  # (B, P + T)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=attention).logits[:, prompt_len - 1 : -1].float()  # (B, T, V)
    done = (completion == tok.eos_token_id).int().cumsum(-1)  # (B, T) tokens after the first EOS are padding
    valid = (done - (completion == tok.eos_token_id).int()) == 0  # (B, T) up to and including the EOS
    vocab = logits.size(-1)
    first = first_occurrence(enc["input_ids"], enc["attention_mask"], completion, vocab)  # (B, V)
    proc = SamplerProcessors("transformers", **settings)
    batch, length = completion.shape
    pos = torch.arange(length).repeat(batch)
    seen = first.repeat_interleave(length, 0) < pos.unsqueeze(-1)
    theta = proc.logprobs_at(logits.reshape(-1, vocab), completion.reshape(-1, 1), seen).view(batch, length)
    assert valid.sum() > 10
    torch.testing.assert_close(theta[valid], rollout[valid], rtol=0, atol=1e-6)
    plain = torch.log_softmax(logits / settings.get("temperature", 1.0), -1).gather(-1, completion.unsqueeze(-1))
    assert (plain.squeeze(-1) - rollout)[valid].abs().max() > 1e-3  # without the processors: a mismatch


# --------------------------------------------------------------------------- construction and refusals
def _args(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0, generation_kwargs=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_from_config_reads_fields_and_generation_kwargs():
    assert SamplerProcessors.from_config(_args()) is None
    assert SamplerProcessors.from_config(_args(temperature=0.7)) is None  # the loss forward's temperature
    proc = SamplerProcessors.from_config(_args(top_k=20, generation_kwargs={"top_p": 0.9, "max_new_tokens": 4}))
    assert (proc.engine, proc.top_k, proc.top_p, proc.min_p) == ("transformers", 20, 0.9, 0.0)
    # generation_kwargs override the fields, as TRL applies them: a different generation temperature is active
    proc = SamplerProcessors.from_config(_args(generation_kwargs={"temperature": 0.5}))
    assert proc.temperature == 0.5 and proc.active
    assert SamplerProcessors.from_config(_args(use_vllm=True, top_k=-1)) is None  # vLLM's "off"
    assert SamplerProcessors.from_config(_args(use_vllm=True, min_p=0.1)).engine == "vllm"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"typical_p": 0.9},
        {"epsilon_cutoff": 3e-4},
        {"eta_cutoff": 3e-4},
        {"no_repeat_ngram_size": 3},
        {"bad_words_ids": [[5]]},
        {"sequence_bias": {(5,): -1.0}},
        {"min_new_tokens": 2},
        {"forced_eos_token_id": 1},
        {"begin_suppress_tokens": [3]},
        {"num_beams": 2},
        {"do_sample": False},
        {"guidance_scale": 1.5},
        {"encoder_repetition_penalty": 1.1},
        {"exponential_decay_length_penalty": (2, 1.1)},
    ],
)
def test_transformers_refuses_what_it_does_not_reproduce(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}="):
        SamplerProcessors.from_config(_args(generation_kwargs=kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"min_tokens": 3},
        {"bad_words": ["x"]},
        {"logit_bias": {5: 1.0}},
        {"allowed_token_ids": [1, 2]},
        {"logits_processors": ["pkg:Proc"]},
        {"structured_outputs": {"regex": "a+"}},
        {"top_a": 0.2},
    ],
)
def test_vllm_refuses_what_it_does_not_reproduce(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"{name}"):
        SamplerProcessors.from_config(_args(use_vllm=True, generation_kwargs=kwargs))


def test_vllm_refuses_structured_outputs_and_accepts_harmless_keys():
    with pytest.raises(ValueError, match="vllm_structured_outputs_regex"):
        SamplerProcessors.from_config(_args(use_vllm=True, top_k=5, vllm_structured_outputs_regex="a+"))
    kw = {"seed": 1, "stop": ["\n"], "logprobs": 0, "presence_penalty": 0.0}
    assert SamplerProcessors.from_config(_args(use_vllm=True, generation_kwargs=kw)) is None


def test_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplerProcessors(top_p=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        SamplerProcessors(temperature=0.0)
    with pytest.raises(ValueError, match="needs the \\(N, V\\) context mask"):
        SamplerProcessors(repetition_penalty=1.2).process(torch.zeros(2, 5))
