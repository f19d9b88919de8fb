"""What TRMTrainer relies on from TRL's GRPOTrainer (trl pinned to 1.16): if TRL changes a seam, this fails first."""

from __future__ import annotations

import inspect

import torch
import trl
from trl import GRPOTrainer

from trl_trm import TRMTrainer


def test_trl_is_the_tested_minor():
    assert trl.__version__.startswith("1.16."), f"trl_trm is tested against trl 1.16, found {trl.__version__}"


def test_compute_loss_reads_advantages_after_the_logps_forward():
    # TRMTrainer evaluates the mask inside `_get_per_token_logps_and_entropies` and scales `inputs["advantages"]`,
    # which `_compute_loss` must read afterwards (and read only once, from `inputs`).
    src = inspect.getsource(GRPOTrainer._compute_loss)
    forward = src.index("self._get_per_token_logps_and_entropies(")
    read = src.index('advantages = inputs["advantages"]')
    assert forward < read
    assert src.count("self._get_per_token_logps_and_entropies(") == 1
    assert "advantages.dim() == 1" in src  # (B, T) advantages are supported


def test_generate_returns_logprobs_at_index_4(make_trainer):
    trainer = make_trainer()
    out = trainer._generate(["1+1=", "2+2=", "3+3=", "4+4="])
    assert len(out) == 8
    prompt_ids, completion_ids, logprobs = out[0], out[1], out[4]
    assert len(prompt_ids) == len(completion_ids) == len(logprobs) == 4
    assert [len(c) for c in completion_ids] == [len(lp) for lp in logprobs]
    assert all(v <= 0.0 for lp in logprobs for v in lp)


def test_generate_and_score_keys_and_shapes(make_trainer, toy_dataset):
    trainer = make_trainer()
    trainer.model.train()
    batch = [toy_dataset[i] for i in range(4)]
    out = GRPOTrainer._generate_and_score_completions(trainer, batch)  # super(), without our post-processing
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch"):
        assert key in out, key
    assert "sampling_per_token_logps" in out  # TRL pads the log-probs our `_generate_single_turn` captured
    B, T = out["completion_ids"].shape
    assert out["completion_mask"].shape == (B, T)
    assert out["sampling_per_token_logps"].shape == (B, T)
    assert out["sampling_per_token_logps"].dtype == torch.float32
    assert out["advantages"].shape == (B,)
    assert out["prompt_ids"].shape == out["prompt_mask"].shape
    assert "importance_sampling_ratio" not in out  # TRL's own correction is off under TRMConfig
    assert TRMTrainer._generate_and_score_completions is not GRPOTrainer._generate_and_score_completions


def test_transformers_generate_builds_processors_and_stopping_criteria_through_the_hooked_methods():
    # trl_trm.rollout records the processed log-probs by shadowing these two GenerationMixin methods for one
    # `generate` call: `generate` must still build its processor list and stopping criteria through them.
    from transformers import GenerationMixin

    src = inspect.getsource(GenerationMixin.generate)
    assert "self._get_logits_processor(" in src
    assert "self._get_stopping_criteria(" in src
    for name in ("_get_logits_processor", "_get_stopping_criteria"):
        assert callable(getattr(GenerationMixin, name))


def test_trl_log_averages_metric_lists_and_clears_them():
    # TRMTrainer.log puts one window-reduced value per trm/ key into `_metrics`; TRL's `log` must average the list
    # (a single value passes unchanged) and clear it afterwards.
    src = inspect.getsource(GRPOTrainer.log)
    assert "sum(valid) / len(valid)" in src
    assert "self._metrics[mode].clear()" in src


def test_class_docstring_lists_exactly_the_trl_methods_it_overrides():
    # The class docstring is the map of the trainer: every GRPOTrainer/Trainer method TRMTrainer overrides is listed
    # there with its reason, and nothing else is.
    import re

    from trl_trm.trainer_io import TrainerIOSeams

    overridden = {
        name
        for cls in (TRMTrainer, TrainerIOSeams)  # the I/O seams live in a mixin of TRMTrainer's
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("_trm") and hasattr(GRPOTrainer, name)
    }
    bullets = [line.strip() for line in TRMTrainer.__doc__.splitlines() if line.strip().startswith("* `")]
    listed = {name for line in bullets for name in re.findall(r"`(\w+)`", line.split(":")[0])}
    assert overridden == listed
    assert "_generate_single_turn" in overridden and "log" in overridden


def test_calculate_rewards_returns_the_rewards_gathered_over_processes():
    # TRMTrainer._calculate_rewards counts non-finite rewards in what TRL returns: the (N, F) tensor of every process.
    params = list(inspect.signature(GRPOTrainer._calculate_rewards).parameters)
    assert params == ["self", "inputs", "prompts", "completions", "completion_ids_list"]
    src = inspect.getsource(GRPOTrainer._calculate_rewards)
    assert "rewards_per_func = gather(rewards_per_func)" in src and src.rstrip().endswith("return rewards_per_func")
    assert "self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in inspect.getsource(
        GRPOTrainer._generate_and_score_completions
    )


def test_trainer_computes_the_grad_norm_through_get_grad_norm_and_checkpoints_through_get_output_dir():
    # `_get_grad_norm` is called at every optimizer step (the zero-gradient check); `_save_checkpoint` writes every
    # file under `_get_output_dir(trial=trial)` (the staged checkpoint) and rotates that folder.
    from transformers import Trainer

    assert list(inspect.signature(Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    assert "grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)" in inspect.getsource(Trainer._run_epoch)
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    save = inspect.getsource(Trainer._save_checkpoint)
    assert "run_dir = self._get_output_dir(trial=trial)" in save and "output_dir = os.path.join(run_dir," in save
    assert "output_dir=run_dir," in save  # rotate_checkpoints of the staging folder: TRMTrainer rotates the real one
    assert "self._get_output_dir(trial=trial)" in inspect.getsource(GRPOTrainer._save_checkpoint)


def test_fused_head_call_that_the_one_pass_head_stands_in_for():
    """`trl_trm.head_pass.OnePassHead` replaces `_ChunkedLogProbFunction.apply` for one loss forward: it relies on the
    positional arguments TRL passes, the 5-tuple TRL unpacks, the optional outputs GRPOTrainer asks for, and the ZeRO-3
    gather context it re-enters in the backward (issue 22)."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    from trl_trm import head_pass
    from trl_trm.lm_head import _bind_head_args

    params = list(inspect.signature(chunked_logprob.ChunkedLogProbFunction.forward).parameters)[1:]
    assert params == list(inspect.signature(_bind_head_args).parameters)  # same names, same order
    head = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "per_token = _ChunkedLogProbFunction.apply(" in head
    assert "log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = per_token" in head
    assert "with autocast_ctx, maybe_gather_lm_head_ctx(weight, bias):" in head  # forward already gathered
    assert callable(trl_utils.maybe_gather_lm_head_ctx)
    assert head_pass.OPTIONAL_OUTPUTS == chunked_logprob.OPTIONAL_OUTPUTS
    assert head_pass.VOCAB_CHUNK == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    init = inspect.getsource(GRPOTrainer.__init__)
    assert 'outputs=("log_probs", "entropy")' in init
