"""`TRMTrainer`: TRL's `GRPOTrainer` with Trust Region Masking. A thin subclass: it wires TRL's seams to collaborators
that run without TRL (rollout, topk, lm_head, masking, window, loss_inputs, setup_checks, vllm_checks, adaptive, hub),
and gathers across processes; the class docstring lists each override and why.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from trl import GRPOTrainer

from . import moe, routing, topk
from .callbacks import TRMStatsCallback
from .config import TRMConfig
from .loss_inputs import detach_unweighted, old_logps_for, rollout_as_old_policy, weight_loss_inputs
from .masking import (
    TrustRegionMaskOutput,
    estimator_weights,
    mask_and_weights,
    old_seq_log_ratio,
    seq_tis_auto_clip,
)
from .processors import sampler_for_trainer
from .rollout import RolloutLogprobChecks, record_sampling_logprobs
from .run_health import RunHealth
from .setup_checks import check_old_policy, check_trainer_setup, setup_rollout_topk, trm_config_for
from .topk import BATCH_KEYS
from .trainer_io import TrainerIOSeams
from .vllm_checks import check_trainer_engine
from .window import MetricsWindow, pack_sequence_stats, sequence_statistics

# The `TRMConfig.trm_<name>` fields the math reads (the adaptive controller overrides the two deltas).
MASK_SETTINGS = "mode delta_max delta_avg geo_low geo_high ratio_min ratio_factor delta_kl nonfinite".split()


class TRMTrainer(TrainerIOSeams, GRPOTrainer):
    """[`~trl.GRPOTrainer`] with Trust Region Masking. Same constructor as `GRPOTrainer`; `args` is a [`TRMConfig`].

    Rollout log-probs come from vLLM, a `rollout_func` returning `logprobs`, or plain transformers generation
    (captured here). Statistics are logged under `trm/` (docs/metrics.md). The overrides, each calling `super()`
    (the why of each, at length: docs/seams.md):

    * `__init__`: refuses settings under which TRM would be silently wrong; builds the collaborators.
    * `_generate_single_turn`: records the processed sampling log-probs (and top-k) of transformers generation, which
      TRL does not; with vLLM and `trm_rollout_topk`, the sampled token's log-prob by id (`lp[0]` is the top-1's).
      On an MoE model it also records the experts each token was routed to (`trl_trm.routing`).
    * `_generate`: checks the rollout log-probs before TRL pads them (silently); collects the rollout top-k.
    * `_calculate_rewards`: counts non-finite rewards in TRL's gathered (N, F) tensor (`trm/reward_nonfinite_frac`,
      one warning; no finite reward in a whole run is an error at its end).
    * `_generate_and_score_completions`: with `trm_calibrate_accept`, first sets the thresholds from the first batch's
      prompts (`trl_trm.calibrate`, before any optimiser step); pads the top-k into (B, T, k) `trm_topk_*` tensors
      (split and shuffled by row with the batch); with `trm_mask_policy="generation"`, evaluates the mask once. With
      `trm_old_policy="rollout"`, arms the skip of TRL's old-log-prob forward (below) when TRL would run it.
    * `_compute_loss`: hands a shallow copy of the batch (reused across `num_iterations`) to the forward below; with
      `trm_old_policy="rollout"` its `old_per_token_logps` are the rollout's (π_old := π_roll).
    * `_get_per_token_logps_and_entropies`, during `_compute_loss` only: the one point in TRL's loss where π_θ's
      log-probs exist before the advantages are read (TRL has no per-token loss-weight hook): captures π_θ at the
      top-k ids, evaluates the mask, and scales the advantages by the (B, T) weights (`trl_trm.loss_inputs`). With
      `trm_old_policy="rollout"`, TRL's no-grad old-log-prob forward in `_generate_and_score_completions` (the first
      call there) is not run: a placeholder is returned and dropped from the batch. On an MoE model every forward
      of a generated batch compares its routes with the rollout's and, with `trm_routing_replay`, uses the rollout's.
    * `log`: reduces the `trm/` window once, before TRL averages its `_metrics` lists.
    * `_get_grad_norm`: records whether each optimizer step's gradient was non-zero.
    * `train`: then one warning and `trm_run_problem` (`trl-trm train` exits 1 on it) when the run could not learn
      (no finite reward, every sequence rejected, or zero gradient at every step: `trl_trm.run_health`).
    The I/O seams come from the mixin :class:`~trl_trm.trainer_io.TrainerIOSeams`:

    * `_save_checkpoint`, `_load_optimizer_and_scheduler`: the adaptive thresholds too; a checkpoint is staged and
      renamed into place whole (`trl_trm.atomic_checkpoint`), a failed write is one line naming the last whole one.
    * `_get_output_dir`: the staging folder while `_save_checkpoint` writes, TRL's folder otherwise.
    * `create_model_card`, `init_hf_repo`, `push_to_hub`: a TRM section in the card; one line if the Hub is unreachable.
    * `end`: flushes pending collectives before the process group is torn down (`trl_trm.distributed`).

    Seam for subclasses: `_trm_weights`, the loss weights of one batch's mask (`experiments/mismatch_study.py`).
    """

    _tag_names = ["trl", "grpo", "trm"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: TRMConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):  # GRPOTrainer's signature, defaults included (tests/test_cli_errors.py pins it)
        forwarded = {
            k: v for k, v in locals().items() if k not in ("self", "model", "reward_funcs", "args", "__class__")
        }
        super().__init__(model, reward_funcs, trm_config_for(model, args), **forwarded)
        self._trm_setup()

    def _trm_setup(self) -> None:
        """Start-up checks, then the collaborators and the per-run state."""
        args = self.args
        check_trainer_setup(self)  # continuous batching without log-probs, the MoE router loss, FSDP not active
        self._trm_routing = routing.check_routing_setup(self)  # MoE routes: recorded, compared, replayed (or None)
        self._trm_capture = not self.use_vllm and self.rollout_func is None
        self._trm_checks = RolloutLogprobChecks()
        self._trm_window = MetricsWindow()  # the trm/ statistics since the last log, reduced in `log`
        self._trm_staging: str | None = None  # `_get_output_dir` while a checkpoint is staged
        self._trm_health = RunHealth()  # could this `train()` learn anything? (checked when it returns)
        self.trm_run_problem: str | None = None  # why the last `train()` could not learn (None: it could)
        self._trm_loss_inputs: dict[str, Any] | None = None
        self._trm_bypass = args.trm_old_policy == "rollout"  # π_old := π_roll (docs/modes.md)
        self._trm_skip_old_forward = False  # armed while TRL would run its old-log-prob forward, in bypass mode
        self.trm_skipped_old_forwards = 0  # how many TRL old-log-prob forwards bypass mode skipped
        self._trm_topk = args.trm_rollout_topk
        self._trm_topk_stash = self._trm_pending_topk = None  # top-k of the last turn / of the batch being built
        if self._trm_topk > 0:
            setup_rollout_topk(self)  # top-k checks; vLLM asked for the top-k log-probs
        check_trainer_engine(self)  # vLLM must report processed log-probs, and enough of them (docs/vllm.md)
        self._trm_processors = sampler_for_trainer(self)  # sampler processors to reproduce on π_θ (docs/samplers.md)
        check_old_policy(self)  # bypass with sampler processors: refused
        self._trm_adaptive = args.make_adaptive_thresholds() if args.trm_target_accept_rate is not None else None
        self._trm_calibration = args.make_startup_calibration()  # None unless `trm_calibrate_accept` is set
        # trm_stats.jsonl and its plot; removable with remove_callback(TRMStatsCallback).
        callback = TRMStatsCallback(args.trm_accept_rate_floor, args.trm_accept_rate_patience, plot=args.trm_plot)
        self.add_callback(callback)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        turn = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if self.use_vllm and self._trm_topk > 0:  # vLLM returns the top-k too: the sampled token's log-prob is by id
            with topk.record_vllm_generate(self.vllm_generation) as returned:
                completion_ids, _ = super()._generate_single_turn(*turn)
            _, vllm_ids, logprobs, logprob_token_ids = returned[-1]
            sampled, self._trm_topk_stash = topk.from_vllm(vllm_ids, logprobs, logprob_token_ids, self._trm_topk)
            return completion_ids, sampled
        if not self._trm_capture or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(*turn)
        # Every generation turn (TRL's tool loop calls this once per turn) records its own log-probs, step by step.
        unwrapped, routes = self.accelerator.unwrap_model(self.model_wrapped), self._trm_routing
        with (
            record_sampling_logprobs(unwrapped, self._trm_topk) as recorder,
            routes.recording(unwrapped) if routes is not None else contextlib.nullcontext() as route_recorder,
        ):
            completion_ids, logprobs = super()._generate_single_turn(*turn)
        if routes is not None:
            routes.generated(route_recorder, prompt_ids, completion_ids)
        if logprobs is None:
            logprobs = self._trm_checks.recorded(recorder, completion_ids, self.args.trm_mode)
        if logprobs is not None and recorder.topk_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
            self._trm_topk_stash = topk.from_padded(recorder.topk_logprobs, recorder.topk_ids, lengths, self._trm_topk)
        return completion_ids, logprobs

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        completion_ids, logprobs, engine_func = result[1], result[4], self.rollout_func is not None
        self._trm_checks.generated(completion_ids, logprobs, self.args.trm_mode, engine_func)
        if self._trm_topk > 0:
            recorded, self._trm_topk_stash = self._trm_topk_stash, None
            if logprobs is not None or engine_func:  # else trm_mode="none" without log-probs (warned): no top-k
                extra = result[5] if engine_func else None  # the `rollout_func`'s extra keys
                self._trm_pending_topk = topk.completion_topk(completion_ids, self._trm_topk, extra, recorded)
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # (N, F)
        mode = "train" if self.model.training else "eval"  # N: every process's completions (TRL gathers them)
        health, names, step = self._trm_health, self.reward_func_names, self.state.global_step
        nonfinite, warning = health.observe_rewards(rewards_per_func, mode == "train", names, step)
        self._trm_window.add_rewards(mode, nonfinite, rewards_per_func.size(0))
        if warning is not None:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if self._trm_calibration is not None and self._trm_calibration.pending:  # before the first optimiser step
            self._trm_calibration.apply(self, inputs)  # `trl_trm.calibrate`: thresholds, controller seed, logs
        args = self.args  # TRL runs its old-log-prob forward exactly when generation and accumulation are misaligned
        generate_every = args.steps_per_generation * self.num_iterations
        self._trm_skip_old_forward = self._trm_bypass and args.gradient_accumulation_steps % generate_every != 0
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._trm_skip_old_forward = False
        if self._trm_bypass:
            output.pop("old_per_token_logps", None)  # the skipped forward's placeholder; π_old is π_roll
        if self._trm_routing is not None:
            self._trm_routing.take(output)  # (B, P + C, L, k) `trm_routes`, split and shuffled by row with the batch
        pending, self._trm_pending_topk = self._trm_pending_topk, None
        if pending is not None:  # (B, T, k) tensors, right-padded like completion_ids; TRL splits/shuffles by row
            completion_ids = output["completion_ids"]
            output.update(topk.pad_topk(pending, completion_ids.size(1), self._trm_topk, completion_ids.device))
            vocab = getattr(self.model.config.get_text_config(), "vocab_size", None) or self._trm_topk
            counts = self.accelerator.gather(topk.topk_coverage(output, self._trm_topk, vocab)).sum(dim=0)
            self._trm_window.add_topk_coverage("train" if self.model.training else "eval", counts)
        if "sampling_per_token_logps" not in output:
            return output
        processors = self._trm_processors
        if self.args.trm_mask_policy == "generation":
            logps, theta_topk = self._trm_policy_logps(output)
            old = output["sampling_per_token_logps"] if self._trm_bypass else logps  # bypass: π_old = π_roll
            _, output["trm_weights"] = self._trm_evaluate(logps, old, output, theta_topk)
        elif processors is not None and output.get("old_per_token_logps") is not None:
            # π_old of the ρ factor under the sampler's processors, like π_roll (TRL's old log-probs have none).
            output["trm_old_logps"] = self._trm_generation_logps(output)[0]
        return output

    def _trm_policy_logps(self, output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log π_old of a generated batch as the mask reads it, and (B, T, k + 1) log π_θ at its top-k ids (or
        None): TRL's old log-probs when they exist and nothing more is needed, else one forward of our own."""
        logps = output.get("old_per_token_logps")
        if logps is None or BATCH_KEYS[1] in output or self._trm_processors is not None:  # needs a capture
            return self._trm_generation_logps(output)
        return logps, None

    @torch.no_grad()
    def _trm_generation_logps(self, output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log π of a generated batch under the current policy (processed like the rollout when the sampler has
        processors) and the (B, T, k + 1) log π_θ at its top-k ids, from one forward outside the loss."""
        args = self.args
        batch_size = args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logits_to_keep = output["completion_ids"].size(1)
        capture = topk.head_capture(output, attention_mask, logits_to_keep, batch_size, self._trm_processors)
        if self._trm_routing is not None:
            self._trm_routing.arm(output.get(routing.ROUTES_KEY))
        with capture or contextlib.nullcontext():
            logps, _, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size
            )
        theta_topk, processed = self._trm_head_result(capture)
        return (logps if processed is None else processed), theta_topk

    def _trm_head_result(self, capture) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:func:`~trl_trm.topk.split_head_result`; the window learns the head's vocabulary size (exact KLs or not)."""
        result = topk.split_head_result(capture)
        if capture is not None:
            self._trm_window.head_vocab = capture.vocab_size
        return result

    def _compute_loss(self, model, inputs):
        # Shallow copy: the buffered batch is reused across `num_iterations`, so it must not be modified.
        self._trm_loss_inputs = dict(inputs)
        if self._trm_bypass:
            rollout_as_old_policy(self._trm_loss_inputs)  # TRL's ratio: π_θ/π_roll
        try:
            return super()._compute_loss(model, self._trm_loss_inputs)
        finally:
            self._trm_loss_inputs = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        if self._trm_skip_old_forward and not torch.is_grad_enabled():  # bypass: TRL's old-log-prob forward
            self._trm_skip_old_forward = False
            self.trm_skipped_old_forwards += 1
            placeholder = torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device)  # (B, T), dropped
            return placeholder, None, None
        inputs, self._trm_loss_inputs = self._trm_loss_inputs, None  # act once, on the loss forward only
        batch_size = kw.get("batch_size", a[0] if a else None)
        capture = topk.head_capture(inputs, attention_mask, logits_to_keep, batch_size, self._trm_processors)
        routers = moe.RouterLogitsCapture(model) if inputs is not None and self.aux_loss_enabled else None
        if self._trm_routing is not None:  # MoE: the rollout's routes, replayed and/or compared (`trl_trm.routing`)
            self._trm_routing.arm_forward(inputs, input_ids, logits_to_keep)
        with capture or contextlib.nullcontext(), routers or contextlib.nullcontext():
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *a, **kw
            )
        if inputs is None:
            return out
        if self._trm_routing is not None:  # trm/routing_disagree_frac of this forward, summed over every process
            self._trm_routing.log_counts(inputs, self.accelerator.gather, self._trm_window, model.training)
        weights = self._trm_apply(out[0], inputs, *self._trm_head_result(capture))
        logps, entropies, *rest = out
        if routers is not None and weights is not None and rest and rest[0] is not None:  # aux loss over kept tokens
            rest[0] = moe.masked_aux_loss_of(
                self.accelerator.unwrap_model(model), routers, attention_mask, weights, batch_size
            )
        return (logps, detach_unweighted(entropies, weights), *rest)  # a zero-weight token's entropy: no gradient

    def _trm_apply(self, per_token_logps, inputs, theta_topk=None, processed_logps=None) -> torch.Tensor | None:
        """Mask the loss forward's batch in place (on the shallow copy `_compute_loss` made) and return the (B, T)
        weights, or None when nothing is applied (`trm_mode="none"`, or no rollout log-probs). The mask checks the
        loss forward's log-probs (under the sampler's processors when they are active)."""
        mask_logps = per_token_logps if processed_logps is None else processed_logps
        if "trm_weights" in inputs:  # trm_mask_policy="generation": evaluated once, at generation time
            weights = inputs["trm_weights"]
        elif "sampling_per_token_logps" not in inputs:  # only with trm_mode="none" (checked in `_generate`)
            return None
        else:
            _, weights = self._trm_evaluate(mask_logps, old_logps_for(inputs, mask_logps), inputs, theta_topk)
        if self._trm_adaptive is not None and self.model.training and self.accelerator.sync_gradients:
            self._trm_adaptive.update(self._trm_window.step_accept_rate())  # the step's global rate; applies next step
        if self.args.trm_mode == "none":
            return None
        weight_loss_inputs(inputs, weights, per_token_logps, self.beta)  # scales the per-token loss by the weights
        return weights

    def _trm_evaluate(self, mask_logps, old_logps, inputs, theta_topk=None) -> tuple[TrustRegionMaskOutput, Any]:
        """Mask (of the policy ``mask_logps``) and (B, T) loss weights (``old_logps`` = π_old, the denominator of TRL's
        ratio), logged into the window. The math runs once (`_trm_mask`); a subclass's `_trm_weights` replaces the
        estimator's weights (the default path does not evaluate them twice)."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        sampling = inputs["sampling_per_token_logps"]
        ratio_max, old_seq = self.args.trm_ratio_max, None
        if ratio_max == "auto":  # the (B,) sum_t log π_old/π_roll, once: the clip and the Seq-TIS weights share it
            old_seq = old_seq_log_ratio(old_logps, sampling, mask)
            ratio_max = self._trm_auto_clip(old_logps, sampling, mask, old_seq)
        result, weights = self._trm_mask(mask_logps, inputs, mask, theta_topk, ratio_max, old_logps, old_seq)
        if type(self)._trm_weights is not TRMTrainer._trm_weights:  # the subclass seam
            weights = self._trm_weights(result, old_logps, sampling, mask, ratio_max)  # (B, T)
            result.token_weight_sum = weights.sum(dim=-1).to(result.token_weight_sum.dtype)  # what the loss multiplies
        self._trm_log(result, inputs.get("advantages"), mask)
        return result, weights

    def _trm_mask(self, per_token_logps, inputs, mask, theta_topk, ratio_max, old_logps, old_seq=None):
        """``(result, weights)`` of one batch over ``mask`` (B, T), from one call of the math (`mask_and_weights`);
        ``theta_topk`` (B, T, k + 1), log π_θ at the top-k ids and the sampled token, gives the per-token KL and χ²."""
        args, adaptive = self.args, self._trm_adaptive
        settings = {name: getattr(args, f"trm_{name}") for name in MASK_SETTINGS}
        if self._trm_calibration is not None and self._trm_calibration.thresholds is not None:
            settings.update(self._trm_calibration.thresholds)  # `trm_calibrate_accept`: set before the first step
        if adaptive is not None:
            settings.update(delta_max=adaptive.delta_max, delta_avg=adaptive.delta_avg)
        kl_tok, chi2_tok = topk.topk_kl_terms(inputs, theta_topk, args.trm_mode)  # (B, T) each, or None
        settings.update(ratio_max=ratio_max, kl_tok=kl_tok, chi2_tok=chi2_tok, old_seq_log_ratio=old_seq)
        return mask_and_weights(per_token_logps, inputs["sampling_per_token_logps"], old_logps, mask, **settings)

    def _trm_weights(self, result, old_logps, sampling, mask, ratio_max) -> torch.Tensor:
        """(B, T) loss weights of one batch's mask: the seeds' estimator (:func:`~trl_trm.masking.estimator_weights`;
        in the mask modes an accepted token carries the detached factor π_old/π_roll, TIS modes truncate it). The seam
        for a subclass that weights differently (`experiments/mismatch_study.py` emulates TRL's `sequence_mask`):
        its weights replace the estimator's, and `trm/token_weight` still reports what the loss multiplies."""
        args = self.args
        settings = {"mode": args.trm_mode, "ratio_min": args.trm_ratio_min, "ratio_factor": args.trm_ratio_factor}
        return estimator_weights(result, old_logps, sampling, mask, ratio_max=ratio_max, **settings)

    def _trm_auto_clip(self, old_logps, sampling, mask, old_seq=None) -> float:
        """`trm_ratio_max="auto"`: this batch's Seq-TIS C* over every process; logged as `trm/seq_tis_clip`."""
        clip = seq_tis_auto_clip(old_logps, sampling, mask, gather=self.accelerator.gather, seq=old_seq)
        self._trm_window.add_clip("train" if self.model.training else "eval", clip)
        return clip

    def _trm_log(self, result: TrustRegionMaskOutput, advantages=None, mask=None) -> None:
        """Gather the per-sequence statistics of every process into the logging window (reduced once, in `log`)."""
        mode = "train" if self.model.training else "eval"
        names, local = pack_sequence_stats(sequence_statistics(result, advantages, mask))  # (B, K)
        gathered = self.accelerator.gather(local)  # (num_processes * B, K)
        self._trm_window.add_sequences(mode, names, gathered)
        if mode == "train":
            counted = gathered[:, names.index("length")] > 0  # (N,) sequences with tokens
            self._trm_health.add_sequences(gathered[counted, names.index("keep")].sum(), counted.sum())
        adaptive = self._trm_adaptive
        if adaptive is not None and mode == "train":
            self._trm_window.count_step(mode, names, gathered, adaptive.delta_max, adaptive.delta_avg)

    def _trm_flush_window(self, mode: str) -> None:
        """The window reduced into TRL's `_metrics`: one value per key, which TRL's `log` then reports unchanged."""
        for key, value in self._trm_window.flush(mode, self._trm_topk).items():
            self._metrics[mode][key] = [value]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's `log`, after reducing the `trm/` window once (a max is the window's max over every micro-batch)."""
        self._trm_flush_window("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._trm_health.add_grad_norm(grad_norm)
        return grad_norm

    def train(self, *args, **kwargs):
        """TRL's `train`; then, when this run could not learn, one `RuntimeWarning` and `trm_run_problem` set to the
        one-line reason (`trl-trm train` turns it into a `TrainingError`, exit code 1)."""
        self._trm_health.reset()
        self.trm_run_problem = None
        output = super().train(*args, **kwargs)
        self.trm_run_problem = self._trm_health.problem(self.reward_func_names, self.args.trm_mode)
        if self.trm_run_problem is not None:
            warnings.warn(f"This run could not learn: {self.trm_run_problem}", RuntimeWarning, stacklevel=2)
        return output
