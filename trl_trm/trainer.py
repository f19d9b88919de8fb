"""`TRMTrainer`: TRL's `GRPOTrainer` with Trust Region Masking.

The trainer is thin: the math lives in :mod:`trl_trm.masking`. It overrides four seams of `GRPOTrainer`
(trl 1.16, pinned; `tests/test_seams.py` checks what we rely on) and calls `super()` in each:

* `_generate_single_turn`: with plain transformers generation, records the processed sampling log-probs of the
  sampled tokens (TRL records none on that path; vLLM and `rollout_func` already return them).
* `_generate`: checks that the rollout log-probs exist and have one entry per completion token, before TRL pads
  them (a short list would otherwise be padded silently).
* `_generate_and_score_completions`: with `trm_mask_policy="generation"`, evaluates the mask once per generated
  batch and stores its weights in the batch.
* `_get_per_token_logps_and_entropies`, only during `_compute_loss`: this is the one point inside TRL's loss where
  the current policy's log-probs exist and the advantages have not been read yet. The mask is evaluated there
  (`trm_mask_policy="current"`) and applied by scaling the advantages with the (B, T) weights on a shallow copy of
  the batch. Every loss type of TRL is linear in the advantage with a non-negative factor
  (-min(c1·w·A, c2·w·A) = -w·min(c1·A, c2·A) for w >= 0), so this multiplies the per-token policy loss by the
  weights, and the loss normaliser (`loss_type`'s own, over the whole batch, rejected sequences included) is
  untouched. With `beta != 0`, the reference log-probs of rejected sequences are set to the current (detached)
  log-probs, so their KL term is zero in value and gradient: a rejected sequence contributes exactly zero.

A seam TRL does not offer: a per-token loss-weight hook inside `_compute_loss`. TRL multiplies the loss by
`importance_sampling_ratio` only on the vLLM path; scaling the advantages is the narrowest equivalent.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .config import TRMConfig
from .masking import TrustRegionMaskOutput, compute_trust_region_mask, summarize_mask_stats
from .rollout import record_sampling_logprobs


class TRMTrainer(GRPOTrainer):
    """[`~trl.GRPOTrainer`] with Trust Region Masking. Same constructor as `GRPOTrainer`; `args` is a [`TRMConfig`].

    Rollout log-probs come from, in order: vLLM (`use_vllm=True`), a `rollout_func` returning `logprobs`, or plain
    transformers generation (captured by this trainer). Masking statistics are logged under `trm/` (see README).
    """

    _tag_names = ["trl", "grpo", "trm"]

    def __init__(self, model, reward_funcs, args: TRMConfig | None = None, *pargs, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = TRMConfig(f"{model_name.split('/')[-1]}-TRM")
        elif not isinstance(args, TRMConfig):
            kind = "GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
            raise TypeError(
                f"TRMTrainer needs a `TRMConfig`, got a {kind}. Build it with `TRMConfig(**your_kwargs)`; it accepts "
                "every GRPOConfig field plus the trm_* fields."
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if self.use_transformers_continuous_batching and self.rollout_func is None and args.trm_mode != "none":
            raise ValueError(
                f"`trm_mode={args.trm_mode!r}` needs the rollout log-probs, but transformers continuous batching "
                "(`use_transformers_continuous_batching=True`) does not report them. Use vLLM (`use_vllm=True`), "
                "plain transformers generation (`use_transformers_continuous_batching=False`), or a `rollout_func` "
                "that returns `logprobs`."
            )
        self._trm_capture = not self.use_vllm and self.rollout_func is None
        self._trm_loss_inputs: dict[str, Any] | None = None
        self._trm_warned_no_logprobs = False
        # Adaptive thresholds (off by default): global accept counts of the current optimizer step.
        self._trm_adaptive = args.make_adaptive_thresholds() if args.trm_target_accept_rate is not None else None
        self._trm_step_accept = [0.0, 0.0]  # kept, counted

    # ------------------------------------------------------------------ rollout log-probs
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._trm_capture or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        with record_sampling_logprobs(unwrapped) as recorder:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if logprobs is None and recorder.logprobs is not None:
            logprobs = [recorder.logprobs[i, : len(ids)].tolist() for i, ids in enumerate(completion_ids)]
        return completion_ids, logprobs

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        completion_ids, logprobs = result[1], result[4]
        if self.args.trm_mode != "none" and logprobs is None:
            source = "`rollout_func`" if self.rollout_func is not None else "the generation backend"
            raise ValueError(
                f"`trm_mode={self.args.trm_mode!r}` needs the rollout engine's per-token log-probs, but {source} "
                "returned `logprobs=None`. Return one log-prob per completion token (vLLM: `SamplingParams("
                "logprobs=0)` gives the sampled token's), or set `trm_mode='none'`."
            )
        if logprobs is None and not self._trm_warned_no_logprobs:
            warnings.warn(
                "No rollout log-probs are available (trm_mode='none'): the trm/ diagnostics are not logged.",
                stacklevel=2,
            )
            self._trm_warned_no_logprobs = True
        if logprobs is not None:
            for i, (ids, lps) in enumerate(zip(completion_ids, logprobs, strict=True)):
                if len(ids) != len(lps):
                    raise ValueError(
                        f"Rollout log-probs do not match the completion: sequence {i} has {len(ids)} completion "
                        f"tokens but {len(lps)} log-probs. Return exactly one log-prob per completion token."
                    )
        return result

    # ------------------------------------------------------------------ mask
    def _trm_mask(self, per_token_logps: torch.Tensor, inputs: dict[str, Any]) -> TrustRegionMaskOutput:
        args = self.args
        sampling = inputs.get("sampling_per_token_logps")
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        adaptive = self._trm_adaptive
        return compute_trust_region_mask(
            per_token_logps,
            sampling,
            mask,
            mode=args.trm_mode,
            delta_max=adaptive.delta_max if adaptive else args.trm_delta_max,
            delta_avg=adaptive.delta_avg if adaptive else args.trm_delta_avg,
            geo_low=args.trm_geo_low,
            geo_high=args.trm_geo_high,
            ratio_min=args.trm_ratio_min,
            ratio_max=args.trm_ratio_max,
            nonfinite=args.trm_nonfinite,
        )

    def _trm_log(self, result: TrustRegionMaskOutput) -> None:
        """Gather the per-sequence statistics of every process and append global-batch metrics to TRL's."""
        mode = "train" if self.model.training else "eval"
        stats = result.sequence_stats()
        names = list(stats)
        local = torch.stack([stats[n].float() for n in names], dim=1)  # (B, K)
        gathered = self.accelerator.gather(local)  # (num_processes * B, K)
        metrics = summarize_mask_stats({n: gathered[:, j] for j, n in enumerate(names)})
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if self._trm_adaptive is not None and mode == "train":
            counted = gathered[:, names.index("length")] > 0
            self._trm_step_accept[0] += float(gathered[counted, names.index("keep")].sum())
            self._trm_step_accept[1] += float(counted.sum())
            self._metrics[mode]["trm/delta_max"].append(self._trm_adaptive.delta_max or float("nan"))
            self._metrics[mode]["trm/delta_avg"].append(self._trm_adaptive.delta_avg or float("nan"))

    def _trm_adapt(self) -> None:
        """At an optimizer-step boundary, move the thresholds toward the target using the step's global accept rate
        (identical on every process: it is computed from gathered statistics)."""
        kept, counted = self._trm_step_accept
        if counted > 0:
            self._trm_adaptive.update(kept / counted)
        self._trm_step_accept = [0.0, 0.0]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.trm_mask_policy == "generation" and "sampling_per_token_logps" in output:
            logps = output.get("old_per_token_logps")
            if logps is None:
                logps = self._trm_generation_logps(output)
            result = self._trm_mask(logps, output)
            self._trm_log(result)
            output["trm_weights"] = result.weights
            output["trm_keep"] = result.keep
        return output

    @torch.no_grad()
    def _trm_generation_logps(self, output: dict[str, Any]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logps, _, _ = super()._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size
        )
        return logps

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        # Shallow copy: the buffered batch is reused across `num_iterations`, so it must not be modified.
        self._trm_loss_inputs = dict(inputs)
        try:
            return super()._compute_loss(model, self._trm_loss_inputs)
        finally:
            self._trm_loss_inputs = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *a, **kw)
        inputs, self._trm_loss_inputs = self._trm_loss_inputs, None  # act once, on the loss forward only
        if inputs is not None:
            self._trm_apply(out[0], inputs)
        return out

    def _trm_apply(self, per_token_logps: torch.Tensor, inputs: dict[str, Any]) -> None:
        if "trm_weights" in inputs:  # trm_mask_policy="generation": evaluated once, at generation time
            weights, keep = inputs["trm_weights"], inputs["trm_keep"]
        elif "sampling_per_token_logps" not in inputs:  # only with trm_mode="none" (checked in `_generate`)
            return
        else:
            result = self._trm_mask(per_token_logps, inputs)
            self._trm_log(result)
            weights, keep = result.weights, result.keep
        if self._trm_adaptive is not None and self.model.training and self.accelerator.sync_gradients:
            self._trm_adapt()  # after this micro-batch's mask: the new thresholds apply from the next step on
        if self.args.trm_mode == "none":
            return
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        inputs["advantages"] = advantages * weights.to(advantages.dtype)  # (B, T)
        if self.beta != 0.0 and "ref_per_token_logps" in inputs:
            inputs["ref_per_token_logps"] = torch.where(
                keep.unsqueeze(1), inputs["ref_per_token_logps"], per_token_logps.detach()
            )

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
