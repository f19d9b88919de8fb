"""Memory of the step-by-step capture (`trl_trm.rollout.record_sampling_logprobs`) during `generate` (issue 23).

Issue 23: at V = 151,936 and 32 completions x 256 tokens, TRMTrainer's generation turn reached 5.3 GiB of RSS against
GRPOTrainer's 0.6 GiB, growing by about one (B, V) float32 block (B·V·4 bytes) per decoding step. No (B, V) tensor
was alive past its step (glibc's `mallinfo2` during `generate`: ~0.2 GiB in use, 5.6 GiB freed but kept in the heap,
given back by `malloc_trim(0)`): the recorder kept two small new allocations per step until the end of `generate` (the
(B, 1) log-probs and a view of each step's `input_ids`); glibc placed them in the (B, V) holes that step had just
freed, so no hole could take the next (B, V) tensor and the heap grew every step. Whether a process hits it depends on
the allocator's state (in 8 bare `generate` runs of the same script it happened in most, not all), which is why the
benchmark saw it "at light load" only.

The tests count live allocations with a `TorchDispatchMode` (deterministic, no timing, no RSS):

* the issue's check: no tensor of T·V or more elements exists, and no more (B, V)-sized storages are alive than in
  plain `generate` (a constant), at any step;
* the cause: the capture must not add allocations that outlive their step, so the number of live storages made since
  `generate` started must not grow with the step count (today: constant; before the fix: +2 per step). The first
  check passes on the old code too (its (B, V) tensors did die in time); this one fails on it.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from trl_trm.rollout import processed_logprobs, record_sampling_logprobs

VOCAB = 8192  # widened so that (B, V) tensors stand out from the KV cache and hidden states
BATCH, STEPS = 3, 24  # B < T: a (B, V) tensor is smaller than T·V


class _LiveTensors(TorchDispatchMode):
    """Weak references to every tensor an aten op returns while active (fresh allocations and views)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[weakref.ref, int, int]] = []  # (tensor, storage address, numel)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.refs.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.numel()))
        return out

    def live(self) -> list[tuple[int, int]]:
        """(storage address, numel) of the tracked tensors still alive; drops the dead ones."""
        self.refs = [r for r in self.refs if r[0]() is not None]
        return [(address, numel) for _, address, numel in self.refs]


@pytest.fixture(scope="module")
def wide_model(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    return model.eval()


def _steps_seen(model, capture: bool, topk: int = 0) -> tuple[list[dict], torch.Tensor, object]:
    """Generate STEPS tokens for BATCH rows; at the start of every step (a user logits processor runs first) note the
    live tensors made since `generate` started."""
    seen = []

    class Probe(LogitsProcessor):
        def __call__(self, input_ids, scores):
            live = mode.live()
            seen.append(
                {
                    "storages": len({address for address, _ in live}),
                    "largest": max((numel for _, numel in live), default=0),
                    "vocab_sized": len({address for address, numel in live if numel >= BATCH * VOCAB}),
                }
            )
            return scores

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (BATCH, 4), generator=g)
    settings = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=STEPS, min_new_tokens=STEPS,
        pad_token_id=0, top_k=0, logits_processor=LogitsProcessorList([Probe()]),
    )  # fmt: skip
    torch.manual_seed(0)
    recorder = None
    with torch.no_grad():
        if capture:
            with record_sampling_logprobs(model, topk=topk) as recorder, _LiveTensors() as mode:
                out = model.generate(**settings)
        else:
            with _LiveTensors() as mode:
                out = model.generate(**settings)
    assert len(seen) == STEPS
    return seen, out, recorder


@pytest.mark.parametrize("topk", [0, 4])
def test_no_vocabulary_sized_tensor_accumulates(wide_model, topk):
    plain, _, _ = _steps_seen(wide_model, capture=False)
    seen, out, recorder = _steps_seen(wide_model, capture=True, topk=topk)
    assert recorder.logprobs.shape == (BATCH, STEPS)
    assert max(s["largest"] for s in seen) < STEPS * VOCAB  # nothing of size T·V, ever
    # (B, V)-sized storages alive at a step's start: the logits, their float32 copy, the previous step's scores and
    # probabilities still bound in `_sample` (5 with transformers 5.24), plus the recorder's one `log_softmax` scratch
    # buffer: a constant.
    vocab_sized = [s["vocab_sized"] for s in seen]
    assert max(vocab_sized) <= max(s["vocab_sized"] for s in plain) + 1 <= 7, vocab_sized
    assert max(vocab_sized[STEPS // 2 :]) == max(vocab_sized[1 : STEPS // 2])  # does not grow with t


@pytest.mark.parametrize("topk", [0, 4])
def test_capture_adds_no_allocation_that_outlives_its_step(wide_model, topk):
    """The cause of issue 23: each step's small results must go into buffers allocated once, not into new tensors (or
    views of `input_ids`) kept until `generate` returns, which glibc places in the freed (B, V) holes."""
    plain, _, _ = _steps_seen(wide_model, capture=False)
    captured, _, _ = _steps_seen(wide_model, capture=True, topk=topk)
    plain_growth = plain[-1]["storages"] - plain[1]["storages"]
    growth = captured[-1]["storages"] - captured[1]["storages"]
    # Plain `generate` holds a constant set (cache, ids, mask): the capture may add its buffers once, not per step.
    assert growth <= plain_growth, [s["storages"] for s in captured]
    # The recorder's buffers: log-probs, tokens (+ top-k values and ids) and the (B, V) `log_softmax` scratch.
    assert captured[-1]["storages"] <= plain[-1]["storages"] + 5


def test_capture_is_unchanged_when_generate_runs_past_the_buffer(wide_model):
    """Buffers sized from `max_length` grow by doubling when `generate` samples more steps than planned (a
    `max_length` changed after the processors were built): the values stay those of the oracle."""
    import trl_trm.rollout as rollout

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 400, (BATCH, 4), generator=g)
    original = rollout._capacity
    rollout._capacity = lambda config, prompt_length: 3  # force two doublings over 10 steps
    try:
        with record_sampling_logprobs(wide_model, topk=2) as recorder, torch.no_grad():
            torch.manual_seed(0)
            out = wide_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=10,
                min_new_tokens=10, pad_token_id=0, top_k=0, output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        rollout._capacity = original
    expected = processed_logprobs(out.scores, out.sequences, 2)
    assert torch.equal(recorder.logprobs, expected[0])
    assert torch.equal(recorder.topk_logprobs, expected[1]) and torch.equal(recorder.topk_ids, expected[2])
    assert torch.equal(recorder.token_ids, out.sequences[:, -10:])
