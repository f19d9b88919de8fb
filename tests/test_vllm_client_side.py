"""vLLM client side without vLLM: TRL's real `VLLMGeneration` (server mode) talking to a fake `VLLMClient`, plus the
start-up checks of `trl_trm.vllm_checks.check_trainer_engine` against fake server / engine configurations. No network, no vLLM.

The fake server holds a copy of the tiny model, receives the weight syncs TRL streams to it, samples completions and
reports their log-probs as a vLLM server would (through TRL's own `parse_logprobs`, which maps NaN to None), shifted
by a known `offset` so that the rollout/training mismatch is known exactly. The real-vLLM counterparts are in
tests/vllm_cpu/ (`make test-vllm`).
"""

from __future__ import annotations

import contextlib
import math
import os
from types import SimpleNamespace

import pytest
import torch

from trl_trm.vllm_checks import vllm_engine_problems

OFFSET = 0.01  # fake engine log-prob = served model's fp32 log-prob + OFFSET: |log rho| = 0.01 on every token
SERVER_OK = {"model_config": {"logprobs_mode": "processed_logprobs", "max_logprobs": -1, "dtype": "bfloat16"}}


class FakeVLLMServer:
    """What a `trl vllm-serve` server does for the client, in process."""

    def __init__(self, model_dir, info, nan_at=None, max_tokens=None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.info = info
        self.nan_at = nan_at  # (completion index, position) whose log-prob the engine reports as NaN
        self.synced: list[list[str]] = []  # parameter names received, per weight sync
        self.generate_calls: list[dict] = []
        self.rng = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def completions(self, prompts, n, max_tokens, logprobs, **_):
        """The `/v1/completions` choices: n sampled completions per prompt with their processed log-probs."""
        self.generate_calls.append({"n": n, "logprobs": logprobs})
        vocab = self.model.config.vocab_size
        choices = []
        for prompt in prompts:
            for _ in range(n):
                # Never a special token (ids 0-2): every completion has exactly `max_tokens` tokens.
                completion = torch.randint(3, vocab, (max_tokens,), generator=self.rng).tolist()
                ids = torch.tensor([prompt + completion])
                logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (C, V)
                logps = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
                sampled = logps.gather(1, torch.tensor(completion)[:, None])[:, 0] + OFFSET  # (C,)
                entry = None
                if logprobs is not None:
                    entry = {
                        "tokens": [f"token_id:{t}" for t in completion],
                        "token_logprobs": sampled.tolist(),
                        "top_logprobs": [None] * len(completion),
                    }
                choices.append({"prompt_token_ids": prompt, "token_ids": completion, "logprobs": entry})
        if self.nan_at is not None and choices[self.nan_at[0]]["logprobs"] is not None:
            choices[self.nan_at[0]]["logprobs"]["token_logprobs"][self.nan_at[1]] = float("nan")
        return choices

    def load(self, named_params):
        names = []
        state = self.model.state_dict()
        for name, tensor in named_params:
            assert name in state, f"weight sync sent {name!r}, which the served model does not have"
            state[name].copy_(tensor)
            names.append(name)
        self.synced.append(names)


class FakeVLLMClient:
    """`trl.generation.vllm_client.VLLMClient` with the HTTP calls answered by a `FakeVLLMServer`."""

    server: FakeVLLMServer  # set by the fixture

    def __init__(self, base_url=None, group_port=51216, connection_timeout=0.0, **_):
        self.base_url = base_url

    def init_communicator(self, device):
        pass

    def get_server_info(self):
        return self.server.info  # the `vllm_config` of `/server_info`

    def generate(self, prompts, features=None, n=1, max_tokens=16, logprobs=0, generation_kwargs=None, **params):
        from trl.generation.vllm_client import parse_logprobs

        params = {"n": n, "max_tokens": max_tokens, "logprobs": logprobs, **params, **(generation_kwargs or {})}
        choices = self.server.completions(prompts, **params)
        lps, lp_ids = parse_logprobs([c["logprobs"] for c in choices])  # TRL's own parsing (NaN -> None)
        return {
            "prompt_ids": [c["prompt_token_ids"] for c in choices[::n]],
            "completion_ids": [c["token_ids"] for c in choices],
            "logprobs": lps,
            "logprob_token_ids": lp_ids,
        }

    def update_named_params(self, metadata, named_params):
        self.server.load(named_params)

    def reset_prefix_cache(self):
        pass


@pytest.fixture
def fake_server(tiny_model_dir, monkeypatch):
    """Route TRL's real `VLLMGeneration` (server mode) to a fake server; returns a factory `(info, nan_at)`."""
    import trl.generation.vllm_generation as vllm_generation

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "VLLMClient", FakeVLLMClient)

    def _make(info=SERVER_OK, nan_at=None):
        FakeVLLMClient.server = FakeVLLMServer(tiny_model_dir, info, nan_at=nan_at)
        return FakeVLLMClient.server

    return _make


def _server_trainer(make_trainer, **overrides):
    kwargs = dict(use_vllm=True, vllm_mode="server", bf16=False, max_completion_length=6)
    kwargs.update(overrides)
    return make_trainer(**kwargs)


def _history(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------------------------------- start-up checks
def test_server_with_processed_logprobs_trains_on_the_servers_logprobs(make_trainer, fake_server):
    server = fake_server()
    trainer = _server_trainer(make_trainer)
    trainer.train()
    history = _history(trainer)
    assert len(history) == 2
    # TRL synced the weights to the server before each generation, and asked for the sampled token's log-prob.
    assert len(server.synced) == 2 and set(server.synced[0]) == {n for n, _ in trainer.model.named_parameters()}
    assert [c["logprobs"] for c in server.generate_calls] == [0, 0]
    # The mask saw the server's log-probs: |log rho| = OFFSET on every token (fp32 training = the synced model).
    for h in history:
        assert h["trm/log_ratio_abs_max/mean"] == pytest.approx(OFFSET, abs=1e-4)
        assert h["trm/accept_rate"] == 1.0  # default thresholds: delta_max = log 2, delta_avg = 0.01 >> 5e-5
        assert math.isfinite(h["loss"]) and h["grad_norm"] > 0


def test_server_mismatch_above_delta_max_is_rejected(make_trainer, fake_server):
    fake_server()
    trainer = _server_trainer(make_trainer, trm_delta_max=OFFSET / 2, trm_delta_avg=None)
    trainer.train()
    history = _history(trainer)
    assert [h["trm/accept_rate"] for h in history] == [0.0, 0.0]
    assert [h["grad_norm"] for h in history] == [0.0, 0.0]


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logits"])
def test_server_without_processed_logprobs_is_refused_at_startup(make_trainer, fake_server, mode):
    fake_server({"model_config": {"logprobs_mode": mode, "max_logprobs": -1}})
    with pytest.raises(ValueError, match="--logprobs-mode processed_logprobs") as err:
        _server_trainer(make_trainer)
    assert repr(mode) in str(err.value)


def test_server_that_does_not_report_logprobs_mode_is_refused(make_trainer, fake_server):
    fake_server({"model_config": {"max_logprobs": 20}})
    with pytest.raises(ValueError, match="does not report its `logprobs_mode`"):
        _server_trainer(make_trainer)


def test_server_max_logprobs_must_cover_rollout_topk(make_trainer, fake_server):
    fake_server({"model_config": {"logprobs_mode": "processed_logprobs", "max_logprobs": 5}})
    with pytest.raises(ValueError, match="--max-logprobs 8"):
        _server_trainer(make_trainer, trm_rollout_topk=8)
    # Enough (or unlimited, -1) is accepted, and the trainer then asks for k log-probs.
    for max_logprobs in (8, -1):
        fake_server({"model_config": {"logprobs_mode": "processed_logprobs", "max_logprobs": max_logprobs}})
        trainer = _server_trainer(make_trainer, trm_rollout_topk=8)
        assert trainer.vllm_generation.logprobs == 8


def test_mode_none_only_warns(make_trainer, fake_server):
    fake_server({"model_config": {"logprobs_mode": "raw_logprobs", "max_logprobs": -1}})
    with pytest.warns(UserWarning, match="processed_logprobs"):
        _server_trainer(make_trainer, trm_mode="none")


def test_generation_kwargs_asking_for_no_logprobs_is_refused(make_trainer, fake_server):
    # TRL would pass logprobs=None to vLLM, get no log-probs back and fail with a TypeError at the first batch.
    fake_server()
    with pytest.raises(ValueError, match="Remove `logprobs` from `generation_kwargs`"):
        _server_trainer(make_trainer, generation_kwargs={"logprobs": None})


def test_colocate_engine_max_logprobs_checked(make_trainer, monkeypatch):
    """Colocate: the check reads the engine's own ModelConfig (vLLM's default max_logprobs is 20; TRL passes none)."""
    import trl.generation.vllm_generation as vllm_generation

    built = []

    class FakeLLM:
        def __init__(self, **kwargs):
            built.append(kwargs)
            config = SimpleNamespace(logprobs_mode=kwargs.get("logprobs_mode"), max_logprobs=20, max_model_len=128)
            self.llm_engine = SimpleNamespace(model_config=config)

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", FakeLLM, raising=False)
    with _restored_env():  # colocate mode sets RANK, WORLD_SIZE, MASTER_ADDR/PORT for vLLM: keep other tests clean
        with pytest.raises(ValueError, match="trm_rollout_topk <= 20"):
            make_trainer(use_vllm=True, vllm_mode="colocate", bf16=False, trm_rollout_topk=32)
    assert built[-1]["logprobs_mode"] == "processed_logprobs"  # what TRL asks for; the check would catch a change
    with _restored_env():
        trainer = make_trainer(use_vllm=True, vllm_mode="colocate", bf16=False, trm_rollout_topk=20)
    assert trainer.vllm_generation.logprobs == 20
    assert not torch.distributed.is_initialized()


@contextlib.contextmanager
def _restored_env():
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------- bad log-probs
def test_nan_rollout_logprob_is_a_counted_rejection(make_trainer, fake_server):
    # The engine reports NaN for one token of the first completion of every batch; TRL maps it to None, then NaN.
    fake_server(nan_at=(0, 2))
    trainer = _server_trainer(make_trainer)
    trainer.train()
    history = _history(trainer)
    assert [h["trm/nonfinite_frac"] for h in history] == [0.25, 0.25]  # 1 of the 4 sequences per step
    assert [h["trm/reject_rate/nonfinite"] for h in history] == [0.25, 0.25]
    assert [h["trm/accept_rate"] for h in history] == [0.75, 0.75]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)


def test_nan_rollout_logprob_raises_when_asked(make_trainer, fake_server):
    fake_server(nan_at=(0, 2))
    trainer = _server_trainer(make_trainer, trm_nonfinite="raise")
    with pytest.raises(ValueError, match="Non-finite log-probs"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- the pure check
@pytest.mark.parametrize(
    ("config", "requested", "expected"),
    [
        ({"logprobs_mode": "processed_logprobs", "max_logprobs": 20}, 0, []),
        ({"logprobs_mode": "processed_logprobs", "max_logprobs": 20}, 20, []),
        ({"logprobs_mode": "processed_logprobs", "max_logprobs": -1}, 1000, []),
        ({"logprobs_mode": "processed_logprobs", "max_logprobs": 0}, 0, []),
        ({"logprobs_mode": "processed_logprobs", "max_logprobs": 20}, 21, ["--max-logprobs 21"]),
        ({"logprobs_mode": "raw_logprobs", "max_logprobs": 20}, 0, ["--logprobs-mode processed_logprobs"]),
        ({"logprobs_mode": "raw_logprobs", "max_logprobs": 1}, 5, ["'raw_logprobs'", "--max-logprobs 5"]),
        ({}, 0, ["does not report its `logprobs_mode`"]),
        ({"logprobs_mode": SimpleNamespace(value="processed_logprobs"), "max_logprobs": 20}, 0, []),  # an enum
    ],
)
def test_vllm_engine_problems(config, requested, expected):
    problems = vllm_engine_problems(config, requested, server=True)
    assert len(problems) == len(expected)
    for problem, text in zip(problems, expected, strict=True):
        assert text in problem


def test_vllm_engine_problems_colocate_fix_names_the_colocate_setting():
    (problem,) = vllm_engine_problems({"logprobs_mode": "processed_logprobs", "max_logprobs": 20}, 32, server=False)
    assert "trm_rollout_topk <= 20" in problem and "--max-logprobs" in problem


def _check_args(trm_mode="trm", topk=0, generation_kwargs=None):
    return SimpleNamespace(trm_mode=trm_mode, trm_rollout_topk=topk, generation_kwargs=generation_kwargs)


def test_check_vllm_logprobs_server_verdict_comes_from_the_main_process_by_broadcast():
    from trl_trm.vllm_checks import check_vllm_logprobs

    asked, broadcasts = [], []

    def broadcast(verdict):
        broadcasts.append(list(verdict))
        verdict[0] = ["the main process's problem"]  # what rank 0 sent

    client = SimpleNamespace(get_server_info=lambda: asked.append(1) or {"model_config": {}})
    generation = SimpleNamespace(logprobs=0, vllm_client=client)
    with pytest.raises(ValueError, match="the main process's problem"):
        check_vllm_logprobs(_check_args(), generation, "server", False, broadcast)  # not the main process
    assert asked == [] and broadcasts == [[None]]
    ok = {"model_config": {"logprobs_mode": "processed_logprobs", "max_logprobs": -1}}
    generation.vllm_client = SimpleNamespace(get_server_info=lambda: ok)
    check_vllm_logprobs(_check_args(), generation, "server", True, lambda verdict: None)


def test_check_vllm_logprobs_colocate_engine_and_generation_kwargs():
    from trl_trm.vllm_checks import check_vllm_logprobs

    config = SimpleNamespace(logprobs_mode="processed_logprobs", max_logprobs=20)
    generation = SimpleNamespace(logprobs=0, llm=SimpleNamespace(llm_engine=SimpleNamespace(model_config=config)))
    check_vllm_logprobs(_check_args(), generation, "colocate", True, None)
    generation.logprobs = 32  # `trm_rollout_topk=32` set it
    with pytest.raises(ValueError, match=r"^vLLM will not report the rollout log-probs TRM needs:\n- .*<= 20"):
        check_vllm_logprobs(_check_args(topk=32), generation, "colocate", True, None)
    with pytest.raises(ValueError, match="Remove `logprobs` from `generation_kwargs`"):
        check_vllm_logprobs(_check_args(generation_kwargs={"logprobs": None}), generation, "colocate", True, None)
    with pytest.warns(UserWarning, match="The trm/ diagnostics would be wrong") as record:
        check_vllm_logprobs(_check_args("none", topk=32), generation, "colocate", True, None, stacklevel=1)
    assert record[0].filename == __file__  # stacklevel counts from the caller
