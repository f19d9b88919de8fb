"""`TRMTrainer`: TRL's `GRPOTrainer` with Trust Region Masking. A thin subclass: it wires TRL's seams, nothing else.

Each override (listed with its reason in the class docstring; `tests/test_seams.py` pins what they rely on in trl
1.16) calls `super()` and hands the work to a collaborator that runs without TRL: :mod:`trl_trm.rollout` (capture and
checks of the rollout log-probs), :mod:`trl_trm.topk` and :mod:`trl_trm.lm_head` (the `trm_exact` top-k, and π_θ from
TRL's fused LM head), :mod:`trl_trm.masking` (the mask and loss weights of a batch), :mod:`trl_trm.window` (the `trm/`
logging window), :mod:`trl_trm.setup_checks` and :mod:`trl_trm.vllm_checks` (start-up checks), :mod:`trl_trm.adaptive`,
:mod:`trl_trm.hub` and :mod:`trl_trm.callbacks`. What stays here: which batch reaches which collaborator, and the
gathers across processes.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from .callbacks import TRMStatsCallback
from .config import TRMConfig
from .distributed import shutdown_distributed
from .hub import append_trm_section, hub_errors
from .masking import TrustRegionMaskOutput, compute_trust_region_mask, estimator_weights, seq_tis_auto_log_clip
from .processors import sampler_for_trainer
from .rollout import RolloutLogprobChecks, record_sampling_logprobs
from .setup_checks import check_trainer_setup, trm_config_for
from .topk import (
    BATCH_KEYS,
    check_topk_setup,
    completion_topk,
    from_padded,
    from_vllm,
    head_capture,
    pad_topk,
    record_vllm_generate,
    split_head_result,
    topk_coverage,
    topk_kl_terms,
)
from .vllm_checks import check_vllm_logprobs
from .window import MetricsWindow, pack_sequence_stats, sequence_statistics

# `TRMConfig.trm_<name>` fields passed as they are to the mask (the adaptive controller overrides the two deltas).
MASK_SETTINGS = ("delta_max", "delta_avg", "geo_low", "geo_high", "ratio_min", "delta_kl", "nonfinite")


class TRMTrainer(GRPOTrainer):
    """[`~trl.GRPOTrainer`] with Trust Region Masking. Same constructor as `GRPOTrainer`; `args` is a [`TRMConfig`].

    Rollout log-probs come from, in order: vLLM (`use_vllm=True`), a `rollout_func` returning `logprobs`, or plain
    transformers generation (captured by this trainer). Masking statistics are logged under `trm/` (see README).

    The only changes w.r.t. [`~trl.GRPOTrainer`] are these overrides, each calling `super()`:

    * `__init__`: refuses settings under which TRM would be silently wrong and builds the collaborators.
    * `_generate_single_turn`: with plain transformers generation, records the processed sampling log-probs (and top-k)
      of the sampled tokens, which TRL does not; with vLLM and `trm_rollout_topk`, takes the sampled token's log-prob
      by id (TRL's `lp[0]` is then the most probable token's).
    * `_generate`: checks the rollout log-probs before TRL pads them (it would pad a short list silently) and collects
      the rollout top-k.
    * `_generate_and_score_completions`: pads the top-k into (B, T, k) `trm_topk_*` tensors (TRL shuffles and splits
      every tensor by row, so they stay aligned); with `trm_mask_policy="generation"`, evaluates the mask once.
    * `_compute_loss`: hands a shallow copy of the batch (reused across `num_iterations`) to the forward below.
    * `_get_per_token_logps_and_entropies`, during `_compute_loss` only: the one point inside TRL's loss where π_θ's
      log-probs exist and the advantages have not been read yet (TRL has no per-token loss-weight hook). It captures
      π_θ at the top-k ids from the same forward, evaluates the mask and scales the advantages by the (B, T) weights.
      Every TRL loss type is linear in the advantage with a non-negative factor (-min(c1·w·A, c2·w·A) =
      -w·min(c1·A, c2·A) for w >= 0), so this multiplies the per-token policy loss by the weights and leaves
      `loss_type`'s normaliser untouched. With `beta != 0` a zero-weight token's reference log-prob becomes its current
      (detached) one, and its entropy is detached: a rejected sequence contributes exactly zero.
    * `log`: reduces the `trm/` window once, before TRL averages its `_metrics` lists.
    * `_save_checkpoint`, `_load_optimizer_and_scheduler`: save and restore the adaptive thresholds.
    * `create_model_card`, `init_hf_repo`, `push_to_hub`: a TRM section in the card; one clear line when the Hub is
      unreachable.
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
        super().__init__(
            model,
            reward_funcs,
            trm_config_for(model, args),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self._trm_setup()

    def _trm_setup(self) -> None:
        """Start-up checks, then the collaborators and the per-run state."""
        args, engine_func = self.args, self.rollout_func is not None
        continuous = self.use_transformers_continuous_batching
        check_trainer_setup(
            args.trm_mode,
            continuous_batching=continuous and not engine_func,
            aux_loss=self.aux_loss_enabled,
            fsdp=args.fsdp,
            distributed_type=self.accelerator.distributed_type,
        )
        self._trm_capture = not self.use_vllm and not engine_func
        self._trm_checks = RolloutLogprobChecks()
        self._trm_window = MetricsWindow()  # the trm/ statistics since the last log, reduced in `log`
        self._trm_loss_inputs: dict[str, Any] | None = None
        # `trm_rollout_topk`: per-sequence rollout top-k from the last generation turn, then for the batch being built.
        self._trm_topk = args.trm_rollout_topk
        self._trm_topk_stash = self._trm_pending_topk = None
        if self._trm_topk > 0:
            self._trm_topk_setup()
        self._trm_check_vllm()  # vLLM must report processed log-probs, and enough of them (docs/vllm.md)
        self._trm_processors = sampler_for_trainer(self)  # sampler processors to reproduce on π_θ (docs/samplers.md)
        self._trm_adaptive = args.make_adaptive_thresholds() if args.trm_target_accept_rate is not None else None
        # Masking statistics to OUTPUT_DIR/trm_stats.jsonl + plot; removable with remove_callback(TRMStatsCallback).
        floor, patience = args.trm_accept_rate_floor, args.trm_accept_rate_patience
        self.add_callback(TRMStatsCallback(floor, patience, plot=args.trm_plot))

    def _trm_check_vllm(self) -> None:
        """With `use_vllm=True` and no `rollout_func`: vLLM must report the rollout log-probs TRM needs
        (:func:`~trl_trm.vllm_checks.check_vllm_logprobs`: an error, or a warning with `trm_mode="none"`)."""
        if self.use_vllm and self.rollout_func is None:
            from accelerate.utils import broadcast_object_list

            main = self.accelerator.is_main_process
            check_vllm_logprobs(self.args, self.vllm_generation, self.vllm_mode, main, broadcast_object_list, 4)

    def _trm_topk_setup(self) -> None:
        """Checks and vLLM set-up for `trm_rollout_topk = k > 0`."""
        engine_func, k = self.rollout_func is not None, self._trm_topk
        check_topk_setup(k, self.use_transformers_continuous_batching, engine_func, bool(self.tools))
        if self.use_vllm and not engine_func:
            # TRL builds VLLMGeneration with `logprobs=0` (sampled token only); its `generate` reads this attribute on
            # every call (server and colocate), so vLLM then returns the sampled token plus the top-k.
            self.vllm_generation.logprobs = k  # `_trm_check_vllm` then checks the engine's `max_logprobs` against it

    # ------------------------------------------------------------------ generation
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        turn = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if self.use_vllm and self._trm_topk > 0:  # vLLM returns the top-k too: the sampled token's log-prob is by id
            with record_vllm_generate(self.vllm_generation) as returned:
                completion_ids, _ = super()._generate_single_turn(*turn)
            _, vllm_ids, logprobs, logprob_token_ids = returned[-1]
            sampled, self._trm_topk_stash = from_vllm(vllm_ids, logprobs, logprob_token_ids, self._trm_topk)
            return completion_ids, sampled
        if not self._trm_capture or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(*turn)
        # Every generation turn (TRL's tool loop calls this once per turn) records its own log-probs, step by step.
        with record_sampling_logprobs(self.accelerator.unwrap_model(self.model_wrapped), self._trm_topk) as recorder:
            completion_ids, logprobs = super()._generate_single_turn(*turn)
        if logprobs is None:
            logprobs = self._trm_checks.recorded(recorder, completion_ids, self.args.trm_mode)
        if logprobs is not None and recorder.topk_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
            self._trm_topk_stash = from_padded(recorder.topk_logprobs, recorder.topk_ids, lengths, self._trm_topk)
        return completion_ids, logprobs

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        completion_ids, logprobs, engine_func = result[1], result[4], self.rollout_func is not None
        self._trm_checks.generated(completion_ids, logprobs, self.args.trm_mode, engine_func)
        if self._trm_topk > 0:
            recorded, self._trm_topk_stash = self._trm_topk_stash, None
            if logprobs is not None or engine_func:  # else trm_mode="none" without log-probs (warned): no top-k
                extra = result[5] if engine_func else None  # the `rollout_func`'s extra keys
                self._trm_pending_topk = completion_topk(completion_ids, self._trm_topk, extra, recorded)
        return result

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        pending, self._trm_pending_topk = self._trm_pending_topk, None
        if pending is not None:  # (B, T, k) tensors, right-padded like completion_ids; TRL splits/shuffles by row
            completion_ids = output["completion_ids"]
            output.update(pad_topk(pending, completion_ids.size(1), self._trm_topk, completion_ids.device))
            vocab = getattr(self.model.config.get_text_config(), "vocab_size", None) or self._trm_topk
            counts = self.accelerator.gather(topk_coverage(output, self._trm_topk, vocab)).sum(dim=0)
            self._trm_window.add_topk_coverage("train" if self.model.training else "eval", counts)
        if "sampling_per_token_logps" not in output:
            return output
        processors = self._trm_processors
        if self.args.trm_mask_policy == "generation":
            logps, theta_topk = output.get("old_per_token_logps"), None
            if logps is None or BATCH_KEYS[1] in output or processors is not None:  # needs this forward's capture
                logps, theta_topk = self._trm_generation_logps(output)
            _, output["trm_weights"] = self._trm_evaluate(logps, logps, output, theta_topk)
        elif processors is not None and output.get("old_per_token_logps") is not None:
            # π_old of the ρ factor under the sampler's processors, like π_roll (TRL's old log-probs have none).
            output["trm_old_logps"] = self._trm_generation_logps(output)[0]
        return output

    @torch.no_grad()
    def _trm_generation_logps(self, output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log π of a generated batch under the current policy (processed like the rollout when the sampler has
        processors) and the (B, T, k + 1) log π_θ at its top-k ids, from one forward outside the loss."""
        args = self.args
        batch_size = args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logits_to_keep = output["completion_ids"].size(1)
        capture = head_capture(output, attention_mask, logits_to_keep, batch_size, self._trm_processors)
        with capture or contextlib.nullcontext():
            logps, _, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size
            )
        theta_topk, processed = self._trm_head_result(capture)
        return (logps if processed is None else processed), theta_topk

    def _trm_head_result(self, capture) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:func:`~trl_trm.topk.split_head_result`; the window learns the head's vocabulary size (exact KLs or not)."""
        result = split_head_result(capture)
        if capture is not None:
            self._trm_window.head_vocab = capture.vocab_size
        return result

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        # Shallow copy: the buffered batch is reused across `num_iterations`, so it must not be modified.
        self._trm_loss_inputs = dict(inputs)
        try:
            return super()._compute_loss(model, self._trm_loss_inputs)
        finally:
            self._trm_loss_inputs = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        inputs, self._trm_loss_inputs = self._trm_loss_inputs, None  # act once, on the loss forward only
        batch_size = kw.get("batch_size", a[0] if a else None)
        capture = head_capture(inputs, attention_mask, logits_to_keep, batch_size, self._trm_processors)
        with capture or contextlib.nullcontext():
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *a, **kw
            )
        if inputs is None:
            return out
        weights = self._trm_apply(out[0], inputs, *self._trm_head_result(capture))
        logps, entropies, *rest = out
        if weights is not None and entropies is not None:
            # A zero-weight token's entropy keeps its value (TRL's `entropy` metric, the adaptive controller and
            # `top_entropy_quantile` see the policy's) but no gradient: the entropy bonus must not move it.
            entropies = torch.where(weights == 0, entropies.detach(), entropies)
        return (logps, entropies, *rest)

    def _trm_apply(self, per_token_logps, inputs, theta_topk=None, processed_logps=None) -> torch.Tensor | None:
        """Mask the loss forward's batch in place (on the shallow copy `_compute_loss` made) and return the (B, T)
        weights, or None when nothing is applied (`trm_mode="none"`, or no rollout log-probs).

        π_θ for the mask is the loss forward's log-probs (under the sampler's processors when they are active);
        π_old for the ρ factor is TRL's `old_per_token_logps` when it exists (its processed twin `trm_old_logps`
        when processors are active), else the same forward's, detached (TRL's own rule, `num_iterations=1`)."""
        mask_logps = per_token_logps if processed_logps is None else processed_logps
        if "trm_weights" in inputs:  # trm_mask_policy="generation": evaluated once, at generation time
            weights = inputs["trm_weights"]
        elif "sampling_per_token_logps" not in inputs:  # only with trm_mode="none" (checked in `_generate`)
            return None
        else:
            old = next(
                (inputs[k] for k in ("trm_old_logps", "old_per_token_logps") if inputs.get(k) is not None), None
            )
            _, weights = self._trm_evaluate(
                mask_logps, mask_logps.detach() if old is None else old, inputs, theta_topk
            )
        if self._trm_adaptive is not None and self.model.training and self.accelerator.sync_gradients:
            self._trm_adapt()  # after this micro-batch's mask: the new thresholds apply from the next step on
        if self.args.trm_mode == "none":
            return None
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        inputs["advantages"] = advantages * weights.to(advantages.dtype)  # (B, T): scales the per-token loss by w
        if self.beta != 0.0 and "ref_per_token_logps" in inputs:  # zero-weight token: ref := current, KL term zero
            ref = inputs["ref_per_token_logps"]
            inputs["ref_per_token_logps"] = torch.where(weights != 0, ref, per_token_logps.detach())
        return weights

    # ------------------------------------------------------------------ mask
    def _trm_evaluate(self, mask_logps, old_logps, inputs, theta_topk=None) -> tuple[TrustRegionMaskOutput, Any]:
        """Mask (against ``mask_logps``, the policy the mask checks) and the (B, T) loss weights of the seeds'
        estimator (:func:`~trl_trm.masking.estimator_weights`, built from ``old_logps`` = π_old, the policy in the
        denominator of TRL's ratio), logged into the current window."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        sampling = inputs["sampling_per_token_logps"]
        ratio_max = self.args.trm_ratio_max
        if ratio_max == "auto":
            ratio_max = self._trm_auto_clip(old_logps, sampling, mask)
        result = self._trm_mask(mask_logps, inputs, mask, theta_topk, ratio_max)
        weights = self._trm_weights(result, old_logps, sampling, mask, ratio_max)  # (B, T)
        result.token_weight_sum = weights.sum(dim=-1).to(result.token_weight_sum.dtype)  # what the loss multiplies
        self._trm_log(result, inputs.get("advantages"), mask)
        return result, weights

    def _trm_mask(self, per_token_logps, inputs, mask, theta_topk, ratio_max) -> TrustRegionMaskOutput:
        """The mask of one batch over ``mask`` (B, T) (completion × tool mask). ``theta_topk`` (B, T, k + 1): log π_θ at
        the rollout top-k ids and the sampled token; with it, the per-token KL enters as ``kl_tok`` (and its χ² lower
        bound as ``chi2_tok``). ``ratio_max``: `trm_ratio_max` resolved (`"auto"` replaced by this batch's C*)."""
        args, adaptive = self.args, self._trm_adaptive
        settings = {name: getattr(args, f"trm_{name}") for name in MASK_SETTINGS}
        if adaptive is not None:
            settings.update(delta_max=adaptive.delta_max, delta_avg=adaptive.delta_avg)
        kl_tok, chi2_tok = topk_kl_terms(inputs, theta_topk, args.trm_mode)  # (B, T) each, or None
        sampling = inputs["sampling_per_token_logps"]
        return compute_trust_region_mask(
            per_token_logps,
            sampling,
            mask,
            mode=args.trm_mode,
            ratio_max=ratio_max,
            kl_tok=kl_tok,
            chi2_tok=chi2_tok,
            **settings,
        )

    def _trm_weights(self, result, old_logps, sampling, mask, ratio_max) -> torch.Tensor:
        """(B, T) loss weights of one batch's mask: the seeds' estimator (in the mask modes an accepted token carries
        the detached factor π_old/π_roll, so inside TRL's ratio π_θ/π_old its gradient is A·ρ_t·∇log π_θ; TIS modes
        truncate π_old/π_roll). The one place they are built, so a subclass that weights differently (e.g.
        `experiments/mismatch_study.py`'s emulation of TRL's `sequence_mask`) overrides this, and the
        `trm/token_weight` metric still reports what the loss multiplies."""
        args = self.args
        return estimator_weights(
            result,
            old_logps,
            sampling,
            mask,
            mode=args.trm_mode,
            ratio_min=args.trm_ratio_min,
            ratio_max=ratio_max,
            ratio_factor=args.trm_ratio_factor,
        )

    def _trm_auto_clip(self, old_logps, sampling, mask) -> float:
        """`trm_ratio_max="auto"`: C* = sqrt(2 (1 + χ²_seq)) of this batch (s_i = Σ_t log π_old/π_roll, the product
        ratio that Seq-TIS truncates), the same on every process; logged as `trm/seq_tis_clip`."""
        log_w = torch.where(mask.bool(), old_logps.detach().double() - sampling.detach().double(), 0.0)  # (B, T)
        clip = math.exp(seq_tis_auto_log_clip(self.accelerator.gather(log_w.sum(dim=-1))))  # over every process
        self._trm_window.add_clip("train" if self.model.training else "eval", clip)
        return clip

    # ------------------------------------------------------------------ logging window and adaptive thresholds
    def _trm_log(self, result: TrustRegionMaskOutput, advantages=None, mask=None) -> None:
        """Gather the per-sequence statistics of every process into the logging window (reduced once, in `log`)."""
        mode = "train" if self.model.training else "eval"
        names, local = pack_sequence_stats(sequence_statistics(result, advantages, mask))  # (B, K)
        gathered = self.accelerator.gather(local)  # (num_processes * B, K)
        self._trm_window.add_sequences(mode, names, gathered)
        adaptive = self._trm_adaptive
        if adaptive is not None and mode == "train":
            self._trm_window.count_step(mode, names, gathered, adaptive.delta_max, adaptive.delta_avg)

    def _trm_flush_window(self, mode: str) -> None:
        """The window reduced into TRL's `_metrics`: one value per key, which TRL's `log` then reports unchanged."""
        for key, value in self._trm_window.flush(mode, self._trm_topk).items():
            self._metrics[mode][key] = [value]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's `log`, after reducing the `trm/` window (every micro-batch, process and iteration since the last
        log) in one pass: a max is the window's max, a quartile is over the window's sequences."""
        self._trm_flush_window("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _trm_adapt(self) -> None:
        """At an optimizer-step boundary, move the thresholds toward the target using the step's global accept rate
        (identical on every process: it is computed from gathered statistics)."""
        rate = self._trm_window.step_accept_rate()
        if rate is not None:
            self._trm_adaptive.update(rate)

    # ------------------------------------------------------------------ checkpoints (adaptive thresholds)
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._trm_adaptive is not None and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self._trm_adaptive.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._trm_adaptive is not None and checkpoint is not None:
            self._trm_adaptive.load(checkpoint)

    # ------------------------------------------------------------------ Hub
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (tags `trl`, `grpo`, `trm`; base model; GRPO citation) plus a TRM section: settings, final
        accept-rate figures and the TRM citation (`trl_trm.hub.trm_card_section`)."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            append_trm_section(os.path.join(self.args.output_dir, "README.md"), self.args, self.state.log_history)

    def init_hf_repo(self, token=None, private=None):
        # Called from `Trainer.__init__` when push_to_hub=True: an unreachable Hub gets a clear error here.
        with hub_errors("create the repository", self.args.hub_model_id):
            return super().init_hf_repo(token=token, private=private)

    def push_to_hub(self, *args, **kwargs):
        with hub_errors("push to", self.hub_model_id or self.args.hub_model_id):
            return super().push_to_hub(*args, **kwargs)

    # ------------------------------------------------------------------ end of run
    def end(self):
        """`Trainer.end` (finish trackers, destroy the process group), after flushing pending collectives: tearing
        down gloo while its worker thread still frees a gathered tensor deadlocks (see `trl_trm.distributed`)."""
        shutdown_distributed()
        super().end()
