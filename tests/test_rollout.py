"""`trl_trm.rollout`: the step-by-step capture of the processed sampling log-probs on plain transformers generation.

The oracle is the old path: `generate(output_scores=True, return_dict_in_generate=True)` holds every step's processed
(B, V) scores, reduced afterwards by `processed_logprobs`. Both run inside the same `generate` call, so the recorder
must give the very same tensors (`torch.equal`, not allclose), for every sampler setting.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from trl_trm.rollout import processed_logprobs, record_sampling_logprobs, unsupported_generation_mode

SAMPLERS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "top_k": {"temperature": 1.3, "top_k": 5},
    "top_p": {"top_p": 0.8},
    "min_p": {"min_p": 0.05},
    "repetition_penalty": {"repetition_penalty": 1.3},
    "all": {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.01, "repetition_penalty": 1.1},
}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(batch: int = 4):
    """Left-padded prompts of different lengths (pad id 0 under a zero attention mask)."""
    lengths = [3, 7, 5, 2][:batch]
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(5, 400, (n,), generator=g)
        mask[i, -n:] = 1
    return ids, mask


def _generate(model, seed=0, **kwargs):
    ids, mask = _prompts()
    torch.manual_seed(seed)
    settings = dict(do_sample=True, max_new_tokens=16, pad_token_id=0, top_k=0)  # top_k=0: no default top-50
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **settings)


@pytest.mark.parametrize("topk", [0, 3, 700])  # 700 > V: clipped to V
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_recorder_equals_output_scores_reduction_bit_for_bit(model, sampler, topk):
    # Many eos ids: most rows finish early, so the pad tokens after a finish are recorded and compared too.
    kwargs = dict(SAMPLERS[sampler], eos_token_id=list(range(100, 160)))
    with record_sampling_logprobs(model, topk=topk) as recorder:
        out = _generate(model, output_scores=True, return_dict_in_generate=True, **kwargs)
    logprobs, top_values, top_ids = processed_logprobs(out.scores, out.sequences, topk)
    generated = out.sequences[:, -len(out.scores) :]  # (B, T_gen)
    assert recorder.logprobs.dtype == torch.float32 and recorder.logprobs.shape == generated.shape
    assert torch.equal(recorder.logprobs, logprobs)
    assert torch.equal(recorder.token_ids, generated)
    assert (generated == 0).any(), "no row finished early: the pad-after-eos case was not exercised"
    if topk:
        assert torch.equal(recorder.topk_logprobs, top_values) and torch.equal(recorder.topk_ids, top_ids)
        assert recorder.topk_ids.size(-1) == min(topk, model.config.vocab_size)
    else:
        assert recorder.topk_logprobs is None and recorder.topk_ids is None
    if "top_k" in SAMPLERS[sampler]:  # truncation is in the processed distribution: tokens outside have -inf
        top_k = SAMPLERS[sampler]["top_k"]
        assert (out.scores[0] == -torch.inf).sum(-1).min() >= model.config.vocab_size - top_k
        assert torch.isfinite(logprobs[:, 0]).all()  # a sampled token is always inside the kept set


def test_recording_does_not_change_generation_or_its_return_value(model):
    plain = _generate(model, seed=3, temperature=0.9, top_p=0.95)
    with record_sampling_logprobs(model) as recorder:
        recorded = _generate(model, seed=3, temperature=0.9, top_p=0.95)
    assert isinstance(recorded, torch.Tensor)  # not a GenerateOutput: output_scores is no longer forced
    assert torch.equal(plain, recorded)
    assert torch.equal(recorder.token_ids, recorded[:, -recorder.token_ids.size(1) :])
    assert "generate" not in vars(model) and "_get_logits_processor" not in vars(model)  # hooks removed


def test_num_return_sequences_rows_follow_the_sequences(model):
    with record_sampling_logprobs(model, topk=2) as recorder:
        out = _generate(model, num_return_sequences=3, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.size(0) == 12 and recorder.logprobs.size(0) == 12
    expected = processed_logprobs(out.scores, out.sequences, 2)
    assert torch.equal(recorder.logprobs, expected[0]) and torch.equal(recorder.topk_logprobs, expected[1])
    assert torch.equal(recorder.topk_ids, expected[2])


def test_each_generate_call_records_its_own_turn(model):
    with record_sampling_logprobs(model) as recorder:
        first = _generate(model, seed=1, max_new_tokens=5)
        assert recorder.logprobs.size(1) == 5 and torch.equal(recorder.token_ids, first[:, -5:])
        _generate(model, seed=2, max_new_tokens=9)
        assert recorder.logprobs.size(1) == 9 and recorder.num_runs == 2


def test_no_vocabulary_sized_tensor_outlives_a_step(model):
    """At the start of every step (a user logits processor runs first), the previous step's (B, V) scores have been
    reduced and released: only O(B) values per step are held."""
    seen = []

    class Probe(LogitsProcessor):
        def __call__(self, input_ids, scores):
            run = recorder._run
            seen.append((run.pending is None, len(run.logprobs), input_ids.size(1)))
            return scores

    with record_sampling_logprobs(model, topk=4) as recorder:
        _generate(model, max_new_tokens=8, logits_processor=LogitsProcessorList([Probe()]))
    assert len(seen) == 8 and all(released for released, _, _ in seen)
    assert [n for _, n, _ in seen] == list(range(8))  # step t starts with exactly t reduced steps
    vocab = model.config.vocab_size
    held = [recorder.logprobs, recorder.token_ids, recorder.topk_logprobs, recorder.topk_ids]
    assert all(vocab not in t.shape for t in held)


def test_peft_wrapped_model_is_recorded(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).eval()
    ids, mask = _prompts()
    with record_sampling_logprobs(peft_model) as recorder, torch.no_grad():
        torch.manual_seed(0)
        out = peft_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=6, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert torch.equal(recorder.logprobs, processed_logprobs(out.scores, out.sequences)[0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"do_sample": False}, "greedy_search"),
        ({"num_beams": 2, "do_sample": False}, "beam_search"),
        ({"num_beams": 2, "do_sample": True}, "beam_sample"),
    ],
)
def test_non_sampling_modes_record_nothing_and_say_why(model, kwargs, name):
    with record_sampling_logprobs(model) as recorder:
        _generate(model, max_new_tokens=4, **kwargs)
    assert recorder.logprobs is None and name in recorder.problem and "num_beams" in recorder.problem


def test_unsupported_generation_mode_names_the_setting():
    from transformers import GenerationConfig

    assert unsupported_generation_mode(GenerationConfig(do_sample=True)) is None
    assert "do_sample=False" in unsupported_generation_mode(GenerationConfig(do_sample=False))
    assert "num_beams > 1" in unsupported_generation_mode(GenerationConfig(do_sample=True, num_beams=3))


def test_a_generate_that_does_not_sample_records_nothing(model):
    """A replaced `generate` (TRL's tests mock it) returns tokens no sampler produced: nothing is recorded, and the
    hooks are still removed."""
    original = model.generate
    model.generate = lambda input_ids, **kw: torch.cat([input_ids, input_ids[:, :3]], dim=1)
    try:
        with record_sampling_logprobs(model) as recorder:
            model.generate(input_ids=torch.ones(2, 4, dtype=torch.long))
        assert recorder.logprobs is None and recorder.problem is None and recorder.num_runs == 0
        assert model.generate is not original
    finally:
        del model.generate
    assert model.generate == original
