"""The mismatch study (`experiments/`): the rollout engine's mismatch mechanics (fast) and a 2-step smoke run (slow)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `experiments` is a top-level directory of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from experiments.rollout_engine import MismatchRollout  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from trl_trm.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "letters 5"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    return tok, model, [list(prompt)] * 3


def _generate(engine, tok, prompts, seed=0, new=5):
    torch.manual_seed(seed)
    return engine.generate(
        prompts, max_new_tokens=new, temperature=1.0, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id
    )


def _trainer_logps(model, prompts, completions):
    """What the fp32 trainer computes: one full forward over prompt + completion, log-softmax at the sampled ids."""
    out = []
    with torch.no_grad():
        for prompt, comp in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + comp])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1))
    return out


def _max_abs_diff(reported, trainer):
    return max(float((torch.tensor(r) - t).abs().max()) for r, t in zip(reported, trainer, strict=True))


def test_impulse_p0_reports_the_trainers_fp32_logprobs(tiny):
    tok, model, prompts = tiny
    engine = MismatchRollout("impulse", impulse_p=0.0, impulse_sigma=8.0)
    engine.sync(model, step=0)
    out = _generate(engine, tok, prompts)
    assert [len(c) for c in out["completion_ids"]] == [len(lp) for lp in out["logprobs"]]
    diff = _max_abs_diff(out["logprobs"], _trainer_logps(model, prompts, out["completion_ids"]))
    assert diff < 1e-4  # incremental decoding vs one full forward: rounding only


def test_impulse_p1_changes_the_reported_logprobs(tiny):
    tok, model, prompts = tiny
    engine = MismatchRollout("impulse", impulse_p=1.0, impulse_sigma=8.0, seed=1)
    engine.sync(model, step=0)
    out = _generate(engine, tok, prompts)
    assert bool(engine.last_flips.all())  # every position perturbed
    diff = _max_abs_diff(out["logprobs"], _trainer_logps(model, prompts, out["completion_ids"]))
    assert diff > 1.0  # sigma = 8 logit noise: the reported distribution is far from the trainer's


def test_precision_rollout_runs_in_bf16_with_a_small_mismatch(tiny):
    tok, model, prompts = tiny
    engine = MismatchRollout("precision")
    engine.sync(model, step=0)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the trainer's model is untouched
    out = _generate(engine, tok, prompts)
    diff = _max_abs_diff(out["logprobs"], _trainer_logps(model, prompts, out["completion_ids"]))
    assert 1e-5 < diff < 0.1


@pytest.mark.parametrize("k", [0, 2])
def test_stale_weights_are_k_steps_old(tiny, k):
    _, model, _ = tiny
    policy = type(model)(model.config)
    policy.load_state_dict(model.state_dict())
    engine = MismatchRollout("stale", stale_k=k)
    history = []
    for step in range(4):  # an "optimizer step" between syncs: every weight moves
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.01 * (step + 1))
        history.append({n: t.clone() for n, t in policy.state_dict().items()})
        engine.sync(policy, step=step)
        want = max(0, step - k)
        assert engine.weights_step == want
        for name, tensor in engine.model.state_dict().items():
            assert torch.equal(tensor, history[want][name]), (step, name)
    if k > 0:  # the stale copy really differs from the current weights
        assert not torch.equal(engine.model.lm_head.weight, policy.lm_head.weight)


def test_the_rollout_copy_does_not_follow_later_weight_changes(tiny):
    """The engine samples with its own copy (a deep copy would keep a patched `forward` bound to the original)."""
    tok, model, prompts = tiny
    policy = type(model)(model.config)
    policy.load_state_dict(model.state_dict())
    engine = MismatchRollout("none")
    engine.sync(policy, step=0)
    before = _generate(engine, tok, prompts, seed=3)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(0.0)
    after = _generate(engine, tok, prompts, seed=3)
    assert before == after


def test_topk_output_and_bad_arguments(tiny):
    tok, model, prompts = tiny
    engine = MismatchRollout("none", topk=4)
    engine.sync(model, step=0)
    out = _generate(engine, tok, prompts)
    for ids, lps, tids in zip(out["completion_ids"], out["topk_logprobs"], out["topk_token_ids"], strict=True):
        assert len(lps) == len(tids) == len(ids) and all(len(x) == 4 for x in lps)
        assert all(a >= b for row in lps for a, b in zip(row, row[1:], strict=False))  # sorted, descending
    with pytest.raises(ValueError, match="Unknown mismatch kind"):
        MismatchRollout("routing")
    with pytest.raises(ValueError, match="probability"):
        MismatchRollout("impulse", impulse_p=1.5)


def test_flip_fraction0_reports_the_trainers_fp32_logprobs(tiny):
    tok, model, prompts = tiny
    engine = MismatchRollout("flip", flip_fraction=0.0, impulse_sigma=8.0)
    engine.sync(model, step=0)
    out = _generate(engine, tok, prompts, new=8)
    diff = _max_abs_diff(out["logprobs"], _trainer_logps(model, prompts, out["completion_ids"]))
    assert diff < 1e-4
    assert engine.flip_rate == 0.0 and engine.sampled_tokens == sum(len(c) for c in out["completion_ids"])


def test_flip_every_context_fragile_changes_every_position(tiny):
    tok, model, prompts = tiny
    engine = MismatchRollout("flip", flip_fraction=1.0, impulse_sigma=8.0, seed=2)
    engine.sync(model, step=0)
    out = _generate(engine, tok, prompts, new=6)
    assert engine.flip_rate == 1.0
    reported, trainer = out["logprobs"], _trainer_logps(model, prompts, out["completion_ids"])
    per_token = torch.cat([(torch.tensor(r) - t).abs() for r, t in zip(reported, trainer, strict=True)])
    assert float(per_token.median()) > 0.5  # sigma = 8 at every step: most tokens far from the trainer's log-prob


def test_fragile_contexts_are_a_fixed_rare_set_with_deterministic_noise():
    from experiments.rollout_engine import _FragileContexts

    proc = _FragileContexts(fraction=0.01, sigma=8.0, vocab_size=512, seed=3)
    assert abs(float(proc.fragile.float().mean()) - 0.01) < 0.001  # 262,144 pairs
    fragile = proc.fragile.nonzero()[:2].tolist()  # two fragile (prev2, prev1) pairs
    safe = (~proc.fragile).nonzero()[0].tolist()
    ids = torch.tensor([[5, *fragile[0]], [9, *fragile[0]], [5, *fragile[1]], [5, *safe]])  # (4, 3)
    scores = torch.zeros(4, 512)
    out = proc(ids, scores)
    assert proc.flips[-1].tolist() == [True, True, True, False]
    torch.testing.assert_close(out[0], out[1])  # the same context flips the same way, whatever came before it
    assert not torch.equal(out[0], out[2])  # another context, other noise
    assert torch.equal(out[3], scores[3]) and 6.0 < float(out[0].std()) < 10.0
    again = _FragileContexts(fraction=0.01, sigma=8.0, vocab_size=512, seed=3)
    assert torch.equal(again.fragile, proc.fragile)  # the set is fixed by the seed
    torch.testing.assert_close(again(ids, torch.zeros(4, 512)), out)
    with pytest.raises(ValueError, match="flip_fraction"):
        MismatchRollout("flip", flip_fraction=2.0)


def test_realistic_preset_is_the_issues_realistic_regime():
    """Pins the realistic table's settings (docs/mismatch-study.md): completions of >= 64 tokens, >= 5 seeds, rare
    flips (0.1-1 % of contexts), one step of staleness, bf16 precision, the library's estimator (ratio factor on)."""
    from experiments.mismatch_study import KINDS, METHODS, PRESETS
    from trl_trm import TRMConfig

    cfg = PRESETS["realistic"]
    assert len(cfg.seeds) >= 5 and cfg.max_completion_length >= 64 and cfg.answer_len[0] >= 100
    assert set(cfg.kinds) == {"precision", "flip", "stale1"}
    assert 1e-3 <= KINDS["flip"]["flip_fraction"] <= 1e-2 and KINDS["stale1"]["stale_k"] == 1
    assert cfg.learning_rate <= 1e-3 < PRESETS["extreme"].learning_rate
    assert all("trm_ratio_factor" not in METHODS[m] for m in cfg.methods)  # the default: rho_t inside the mask
    assert TRMConfig.__dataclass_fields__["trm_ratio_factor"].default is True
    assert PRESETS["extreme"].tag != cfg.tag and PRESETS["extreme"].plots_dir != cfg.plots_dir
    assert PRESETS["extreme"].kinds == ("precision", "impulse", "stale") and len(PRESETS["extreme"].seeds) == 3


@pytest.mark.slow
def test_study_smoke_writes_results(tmp_path):
    """`--smoke`: the harmful preset's path at toy size (4 optimizer steps = one generated batch reused 4 times):
    clean and collapse, `none` and `trm`, then the two controls from the `trm` run; the rule's tables are written."""
    from experiments import mismatch_study

    report = mismatch_study.main(["--smoke", "--out-dir", str(tmp_path)])
    for name in ("smoke.json", "smoke_runs.csv", "smoke_summary.csv", "smoke_table.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert {"meta", "summary", "runs", "curves"} <= saved.keys()
    runs = {(r["kind"], r["method"]): r for r in report["runs"]}
    assert set(runs) == {("clean", "none")} | {("collapse", m) for m in ("none", "trm", "trm_random", "trm_equal")}
    for r in runs.values():
        assert 0.0 <= r["accept_rate"] <= 1.0
        assert 0.0 <= r["eval_reward_final"] <= 1.0 and 0.0 <= r["train_reward_last"] <= 1.0
        assert math.isfinite(r["grad_norm_max"]) and r["grad_norm_max"] >= 0
    assert runs[("collapse", "none")]["accept_rate"] == 1.0  # no correction: nothing rejected
    trm = runs[("collapse", "trm")]
    assert (
        trm["accept_rate"] < 1.0 and trm["fragile_visits_per_sequence"] > 0
    )  # the collapsed sequences leave the region
    assert (
        trm["collapse_p_token_median"] < 1e-3
    )  # support collapse: the engine's token is one the trainer all but excludes
    assert runs[("collapse", "trm_equal")]["batch"] > runs[("collapse", "trm")]["batch"]  # scaled by 1 / accept
    curves = {(c["kind"], c["method"]): c["curves"] for c in saved["curves"]}
    assert len(curves[("collapse", "trm")]["trm/accept_rate"]) == 4  # one value per optimizer step
    table = (tmp_path / "smoke_table.md").read_text()
    assert "positive control" in table and "| collapse |" in table


def test_trl_sequence_mask_method_weights_kept_sequences_by_their_product_ratio(tmp_path, tiny_model_dir, toy_dataset):
    """The study's emulation of TRL's `sequence_mask` (the `_trm_weights` seam): weight = keep_i * exp(s_i) on every
    token of a kept sequence, 0 elsewhere, and `trm/token_weight/mean` reports those weights."""
    from trainer_kwargs import base_config_kwargs, length_reward

    from experiments.mismatch_study import METHODS
    from experiments.study_arms import trl_sequence_mask_trainer
    from trl_trm import TRMConfig

    args = TRMConfig(**base_config_kwargs(tmp_path / "out", **METHODS["trl_sequence_mask"]))
    trainer = trl_sequence_mask_trainer()(
        model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=toy_dataset
    )
    trainer.model.train()
    theta = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -2.0], [-1.5, -1.0, -0.7]])
    roll = theta - torch.tensor([[0.1], [0.5], [-0.2]])  # s_i = 0.3, 1.5 (> log 3: rejected), -0.6
    batch = {
        "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]]),
        "sampling_per_token_logps": roll,
        "advantages": torch.tensor([1.0, -1.0, 0.5]),
    }
    result, weights = trainer._trm_evaluate(theta, theta, batch)
    assert result.keep.tolist() == [True, False, True]
    want = torch.tensor([[math.exp(0.3)] * 3, [0.0] * 3, [math.exp(-0.4)] * 2 + [0.0]])
    torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-6)
    trainer._trm_flush_window("train")
    assert trainer._metrics["train"]["trm/token_weight/mean"] == [pytest.approx(float(want.sum()) / 8, rel=1e-5)]


def test_aggregate_pairs_each_method_with_the_baseline_of_the_same_seed():
    from experiments.study_report import SUMMARY_FIELDS, aggregate, markdown_table

    def row(method, seed, reward):
        fields = SUMMARY_FIELDS + ("eval_reward_init", "token_weight", "accept_q2", "accept_q3", "mean_length")
        return {
            "kind": "flip",
            "method": method,
            "seed": seed,
            **dict.fromkeys(fields, 0.5),
            "eval_reward_final": reward,
        }

    rows = [row("none", 0, 0.2), row("none", 1, 0.6), row("trm", 0, 0.3), row("trm", 1, 0.6), row("trm", 2, 0.9)]
    agg = {a["method"]: a for a in aggregate(rows)}
    assert agg["trm"]["delta_eval_mean"] == pytest.approx(0.05)  # seeds 0 and 1 only: (+0.1, 0.0); seed 2 unpaired
    assert agg["trm"]["delta_eval_se"] == pytest.approx(0.05)  # stdev 0.0707 / sqrt(2)
    assert agg["none"]["delta_eval_mean"] == 0.0
    table = markdown_table(list(agg.values()), ("flip",), ("none", "trm"))
    assert "| +0.050 ± 0.050 |" in table and "| flip | none | 0.400 ± 0.283 | — |" in table


# ------------------------------------------------------------------------------------------------ issue 17
def test_collapse_puts_its_mass_on_the_fatal_token_at_the_first_crossing_of_the_target(tiny):
    """Support collapse: at the first step where a fragile row's answer reaches its target character count, the engine
    samples from 0.95 x one-hot(token) + 0.05 x policy and reports that distribution's log-prob; safe rows and every
    other step are the policy's own (fp32) distribution."""
    tok, model, prompts = tiny
    engine = MismatchRollout("collapse", collapse_fraction=1.0, collapse_token=3, collapse_mass=0.95)
    engine.sync(model, step=0)
    engine.set_tokenizer(tok)
    out_safe = _generate(engine, tok, prompts, new=8)  # no targets: no fragile row
    assert engine.last_flips is None and not engine.collapse_p_token
    out = engine.generate(prompts, max_new_tokens=8, temperature=1.0, pad_id=tok.pad_token_id,
                          eos_id=tok.eos_token_id, targets=[0, None, 2])  # fmt: skip
    flips = engine.last_flips  # (3, T)
    assert flips[0].tolist()[0] is True and int(flips[0].sum()) == 1  # target 0: the very first step, once
    assert not bool(flips[1].any())  # not fragile
    assert int(flips[2].sum()) <= 1
    trainer = _trainer_logps(model, prompts, out["completion_ids"])
    for row, (reported, exact) in enumerate(zip(out["logprobs"], trainer, strict=True)):
        for t, (r, e) in enumerate(zip(reported, exact.tolist(), strict=True)):
            if bool(flips[row, t]):
                token = out["completion_ids"][row][t]
                want = math.log(0.95 * (token == 3) + 0.05 * math.exp(e))
                assert r == pytest.approx(want, abs=1e-4)
            else:
                assert r == pytest.approx(e, abs=1e-4)
    assert engine.collapse_p_token and all(p < 1e-2 for p in engine.collapse_p_token)  # token 3: untrained, rare
    assert out_safe["completion_ids"]  # the call without targets runs unperturbed
    with pytest.raises(ValueError, match="temperature 1.0"):
        engine.generate(prompts, max_new_tokens=2, temperature=0.7, pad_id=0, eos_id=1, targets=[0, 0, 0])
    with pytest.raises(ValueError, match="collapse_mass"):
        MismatchRollout("collapse", collapse_mass=1.0)


def test_fragile_prompts_are_a_fixed_share_of_the_class_and_length_pairs():
    from experiments.rollout_engine import fragile_prompt_target

    pairs = [f"{k} {n}" for k in ("letters", "digits") for n in range(2, 200)]
    half = [fragile_prompt_target(p, 0.5, seed=4) for p in pairs]
    assert 0.35 < sum(t is not None for t in half) / len(pairs) < 0.65
    assert half == [fragile_prompt_target(p, 0.5, seed=4) for p in pairs]  # fixed by the seed
    assert half != [fragile_prompt_target(p, 0.5, seed=5) for p in pairs]
    assert all(fragile_prompt_target(p, 1.0, seed=0) == int(p.split()[1]) for p in pairs)
    assert fragile_prompt_target("reverse: abc", 1.0, seed=0) is None


def test_stale_engine_uses_the_newest_weights_at_or_before_the_lag_when_syncs_are_sparse(tiny):
    """With num_iterations = 4 the engine syncs every 4 optimizer steps: stale_k = 4 is the previous batch's weights."""
    _, model, _ = tiny
    engine = MismatchRollout("stale", stale_k=4)
    for step in (0, 4, 8, 12):
        engine.sync(model, step=step)
        assert engine.weights_step == max(0, step - 4)


def test_equal_count_batch_scales_by_the_inverse_accept_rate_in_whole_groups():
    from experiments.study_arms import control_setting, equal_count_batch

    assert equal_count_batch(32, 8, 1.0) == 32
    assert equal_count_batch(32, 8, 0.5) == 64
    assert equal_count_batch(32, 8, 0.7) == 48  # 45.7 -> 6 groups of 8
    assert equal_count_batch(32, 8, 0.01) == 128  # at most 4x
    with pytest.raises(ValueError, match="accept_rate"):
        equal_count_batch(32, 8, 1.5)
    run = {"curves": {"trm/accept_rate": [0.5, math.nan, 0.5]}}
    assert control_setting("trm_equal", run, 32, 8) == {"batch": 64}
    assert control_setting("trm_random", run, 32, 8) == {"rates": [0.5, 0.5]}
    with pytest.raises(ValueError, match="not a control"):
        control_setting("trm", run, 32, 8)


def test_random_mask_control_keeps_sequences_at_the_given_rate_without_selection(
    tmp_path, tiny_model_dir, toy_dataset
):
    from trainer_kwargs import base_config_kwargs, length_reward

    from experiments.study_arms import random_mask_trainer
    from trl_trm import TRMConfig

    args = TRMConfig(**base_config_kwargs(tmp_path / "out", trm_mode="trm"))
    trainer = random_mask_trainer([0.25], seed=0)(
        model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=toy_dataset
    )
    trainer.model.train()
    n = 4000
    theta = torch.zeros(n, 3)
    roll = theta.clone()
    roll[: n // 2, 1] = -5.0  # half the sequences far outside TRM's region: selection would reject exactly these
    batch = {"completion_mask": torch.ones(n, 3, dtype=torch.long), "sampling_per_token_logps": roll,
             "advantages": torch.ones(n)}  # fmt: skip
    result, weights = trainer._trm_evaluate(theta, theta, batch)
    kept = result.keep.float()
    assert 0.22 < float(kept.mean()) < 0.28
    assert abs(float(kept[: n // 2].mean()) - float(kept[n // 2 :].mean())) < 0.05  # no selection
    assert torch.equal(weights, kept.unsqueeze(-1).expand(n, 3))  # weight 1 on the kept sequences' tokens


def test_the_rule_pairs_by_seed_and_calls_a_difference_only_beyond_its_paired_se():
    from experiments.study_report import paired, positive_controls, rule_report, trm_verdict

    def rows(kind, method, values):
        return [{"kind": kind, "method": method, "seed": s, "eval_reward_final": v, "accept_rate": 1.0}
                for s, v in enumerate(values)]  # fmt: skip

    seed_effect = [0.0, 0.3, -0.2, 0.1, 0.5]  # large between-seed spread, removed by pairing
    data = rows("clean", "none", [0.6 + e for e in seed_effect])
    data += rows(
        "fam", "none", [0.5 + e + d for e, d in zip(seed_effect, [0.01, -0.01, 0.0, 0.02, -0.02], strict=True)]
    )
    data += rows("fam", "token_mis", [0.52 + e for e in seed_effect])
    data += rows("fam", "trm", [0.6 + e + d for e, d in zip(seed_effect, [0.01, 0.0, -0.01, 0.0, 0.0], strict=True)])
    data += rows("fam", "trm_random", [0.5 + e for e in seed_effect])
    p = paired(data, ("clean", "none"), ("fam", "none"))
    assert p["n"] == 5 and p["mean"] == pytest.approx(0.1) and p["se"] < 0.01
    assert positive_controls(data, "clean", ["fam"])["fam"]["passed"]
    assert trm_verdict(data, "fam", "trm", "token_mis") == "helps"
    assert trm_verdict(data, "fam", "trm_random", "token_mis").startswith("hurts")  # 0.02 below token_mis, SE ~0
    noisy = [dict(r) for r in data]
    for r in noisy:  # an unpaired-looking shuffle of trm: same mean, differences no longer consistent
        if r["method"] == "trm":
            r["eval_reward_final"] += 0.4 * (-1) ** r["seed"]
    assert trm_verdict(noisy, "fam", "trm", "token_mis").startswith("no difference at power")
    failed = [r for r in data if r["kind"] != "clean"] + rows("clean", "none", [0.5 + e for e in seed_effect])
    assert not positive_controls(failed, "clean", ["fam"])["fam"]["passed"]
    table = rule_report(failed, "clean", ["fam"], ("none", "token_mis", "trm", "trm_random"))
    assert "| failed |" in table and "not ranked (control failed)" in table
