"""`TRMTrainer`: TRL's `GRPOTrainer` with Trust Region Masking.

The trainer is thin: the math lives in :mod:`trl_trm.masking`. It overrides these seams of `GRPOTrainer`
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

The weights are the seeds' estimator (:func:`~trl_trm.masking.estimator_weights`): in the mask modes an accepted
token carries the detached factor π_old/π_roll, so inside TRL's ratio r_t = π_θ/π_old its gradient is A·ρ_t·∇log π_θ
(`trm_ratio_factor`); TIS modes truncate π_old/π_roll (TRL's ratio already supplies π_θ/π_old). Zero-weight tokens
also get detached entropies (no entropy-bonus gradient); the MoE router loss cannot be masked and is refused.

* `log`: the `trm/` metrics are buffered per logging window (gathered per-sequence statistics of every micro-batch)
  and reduced once here, before TRL's `log` averages its `_metrics` lists.

A seam TRL does not offer: a per-token loss-weight hook inside `_compute_loss`. TRL multiplies the loss by
`importance_sampling_ratio` only on the vLLM path; scaling the advantages is the narrowest equivalent.

`trm_exact` / `trm_rollout_topk = k` (details in :mod:`trl_trm.topk` and `docs/trm-exact.md`): the rollout's top-k
log-probs and ids are captured on every path (`_generate_single_turn`: transformers `generate` scores, or vLLM asked
for `logprobs=k` through `VLLMGeneration.logprobs`, whose sampled-token log-prob is then matched by id; `_generate`:
a `rollout_func`'s `topk_logprobs`/`topk_token_ids`), padded in `_generate_and_score_completions` into (B, T, k)
`trm_topk_*` tensors (TRL's `shuffle_sequence_dict`/`split_tensor_dict` index every tensor by row, so they stay
aligned). π_θ at those ids comes from the training forward itself: TRL's fused LM head never materialises the
(B, T, V) logits and returns only the sampled token's log-prob, so `_get_per_token_logps_and_entropies` wraps its
per-chunk helper `trl.trainer.utils._ChunkedLogProbFunction` for the call (:class:`~trl_trm.topk.FusedHeadCapture`)
and computes, without gradient and from the same hidden states, log-softmax at the k + 1 ids in row chunks. No
second forward pass; the mask is computed without gradient anyway.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .callbacks import TRMStatsCallback
from .config import TRMConfig
from .distributed import shutdown_distributed
from .hub import append_trm_section, hub_errors
from .masking import (
    TrustRegionMaskOutput,
    compute_trust_region_mask,
    estimator_weights,
    seq_tis_auto_log_clip,
    summarize_mask_stats,
    topk_token_chi2,
    topk_token_kl,
)
from .processors import sampler_for_trainer
from .rollout import check_rollout_logprobs, record_sampling_logprobs
from .topk import (
    BATCH_KEYS,
    FusedHeadCapture,
    from_padded,
    from_rollout_func,
    from_vllm,
    ids_with_sampled,
    pad_topk,
    rollout_topk_outcomes,
)
from .vllm_checks import vllm_engine_problems


class TRMTrainer(GRPOTrainer):
    """[`~trl.GRPOTrainer`] with Trust Region Masking. Same constructor as `GRPOTrainer`; `args` is a [`TRMConfig`].

    Rollout log-probs come from, in order: vLLM (`use_vllm=True`), a `rollout_func` returning `logprobs`, or plain
    transformers generation (captured by this trainer). Masking statistics are logged under `trm/` (see README).
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
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = TRMConfig(f"{model_name.split('/')[-1]}-TRM")
        elif not isinstance(args, TRMConfig):
            kind = "GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
            raise TypeError(
                f"TRMTrainer needs a `TRMConfig`, got a {kind}. Build it with `TRMConfig(**your_kwargs)`; it accepts "
                "every GRPOConfig field plus the trm_* fields."
            )
        super().__init__(
            model,
            reward_funcs,
            args,
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
        if self.use_transformers_continuous_batching and self.rollout_func is None and args.trm_mode != "none":
            raise ValueError(
                f"`trm_mode={args.trm_mode!r}` needs the rollout log-probs, but transformers continuous batching "
                "(`use_transformers_continuous_batching=True`) does not report them. Use vLLM (`use_vllm=True`), "
                "plain transformers generation (`use_transformers_continuous_batching=False`), or a `rollout_func` "
                "that returns `logprobs`."
            )
        if self.aux_loss_enabled and args.trm_mode != "none":
            raise ValueError(
                f"`trm_mode={args.trm_mode!r}` cannot mask the MoE router auxiliary loss: TRL adds it as one scalar "
                "over every token of the micro-batch, so a rejected sequence would still move the router. Set "
                "`router_aux_loss_coef=0.0` in the TRMConfig (or `output_router_logits=False` in the model config), "
                "or use `trm_mode='none'`."
            )
        self._trm_check_sharding()
        self._trm_capture = not self.use_vllm and self.rollout_func is None
        # Logging windows (`log`): gathered per-sequence statistics and counters since the last log, per mode.
        self._trm_window: dict[str, list[dict[str, torch.Tensor]]] = {"train": [], "eval": []}
        self._trm_window_topk: dict[str, list[float]] = {"train": [0.0, 0.0], "eval": [0.0, 0.0]}
        self._trm_window_clip: dict[str, list[float]] = {"train": [], "eval": []}
        self._trm_loss_inputs: dict[str, Any] | None = None
        self._trm_warned_no_logprobs = False
        # `trm_rollout_topk`: per-sequence rollout top-k from the last generation turn, then for the batch being built.
        self._trm_topk = args.trm_rollout_topk
        self._trm_topk_stash = self._trm_pending_topk = None
        self._trm_head_vocab: int | None = None  # the LM head's vocabulary size, seen by the first top-k capture
        if self._trm_topk > 0:
            self._trm_topk_setup()
        self._trm_check_vllm()  # vLLM must report processed log-probs, and enough of them (docs/vllm.md)
        self._trm_processors = sampler_for_trainer(self)  # sampler processors to reproduce on π_θ (docs/samplers.md)
        # Adaptive thresholds (off by default): global accept counts of the current optimizer step.
        self._trm_adaptive = args.make_adaptive_thresholds() if args.trm_target_accept_rate is not None else None
        self._trm_step_accept = [0.0, 0.0]  # kept, counted
        # Masking statistics to OUTPUT_DIR/trm_stats.jsonl + plot; removable with remove_callback(TRMStatsCallback).
        self.add_callback(
            TRMStatsCallback(args.trm_accept_rate_floor, args.trm_accept_rate_patience, plot=args.trm_plot)
        )

    def _trm_check_sharding(self) -> None:
        """Refuse an FSDP setting that Accelerate silently dropped: accelerate 1.15 switches to FSDP only for
        accelerator process groups, so `fsdp` with `use_cpu=True` would train with plain DDP (docs/distributed.md)."""
        from accelerate.utils import DistributedType

        if self.args.fsdp and self.accelerator.distributed_type != DistributedType.FSDP:
            raise ValueError(
                f"`fsdp={self.args.fsdp!r}` has no effect here: Accelerate runs this job as "
                f"{self.accelerator.distributed_type!s} (accelerate enables FSDP only on accelerator processes, not with "
                "`use_cpu=True`), so the model would not be sharded. Remove `fsdp` / `fsdp_config`, or run on GPUs "
                "(see docs/distributed.md)."
            )

    # ------------------------------------------------------------------ vLLM start-up checks
    def _trm_check_vllm(self) -> None:
        """Check at start-up that vLLM will report the rollout log-probs TRM needs (see docs/vllm.md).

        Only with `use_vllm=True` and no `rollout_func` (which would supply the log-probs itself). Three ways to get
        wrong or missing log-probs silently or late, each turned into an error naming the fix (a warning with
        `trm_mode="none"`, which only logs):

        * `generation_kwargs["logprobs"]` overrides the number of log-probs TRL requests from vLLM (`0`, or
          `trm_rollout_topk`); `None` means none at all, and TRL then fails at the first batch with a `TypeError`.
        * The engine's `logprobs_mode` must be `processed_logprobs`: the log-probs of the distribution actually
          sampled from (after temperature, top-k/top-p). Colocated engines get it from TRL; a server gets it from
          `trl vllm-serve`, but a plain `vllm serve` defaults to `raw_logprobs`.
        * The engine's `max_logprobs` (`-1` = unlimited) must be >= the number requested, else vLLM refuses every
          request at the first batch.

        A server's settings are read by the main process (`VLLMClient.get_server_info()`, the `/server_info`
        endpoint that `VLLM_SERVER_DEV_MODE=1` exposes, which TRL's weight sync needs anyway) and the verdict is
        broadcast, so every process stops with the same error instead of waiting in a collective.
        """
        if not self.use_vllm or self.rollout_func is not None:
            return
        from accelerate.utils import broadcast_object_list

        requested = max(int(self.args.trm_rollout_topk or 0), int(getattr(self.vllm_generation, "logprobs", 0) or 0))
        problems = []
        generation_kwargs = self.args.generation_kwargs or {}
        if "logprobs" in generation_kwargs and generation_kwargs["logprobs"] != requested:
            problems.append(
                f"`generation_kwargs['logprobs']={generation_kwargs['logprobs']!r}` overrides the {requested} top "
                "log-probs TRMTrainer requests from vLLM (0 = the sampled token's only; `trm_rollout_topk` sets "
                "more). Remove `logprobs` from `generation_kwargs`."
            )
        if self.vllm_mode == "server":
            verdict = [None]
            if self.accelerator.is_main_process:
                model_config = self.vllm_generation.vllm_client.get_server_info().get("model_config") or {}
                verdict = [vllm_engine_problems(model_config, requested, server=True)]
            broadcast_object_list(verdict, from_process=0)
            problems += verdict[0]
        else:
            model_config = self.vllm_generation.llm.llm_engine.model_config
            problems += vllm_engine_problems(
                {key: getattr(model_config, key, None) for key in ("logprobs_mode", "max_logprobs")},
                requested,
                server=False,
            )
        if not problems:
            return
        message = "vLLM will not report the rollout log-probs TRM needs:\n- " + "\n- ".join(problems)
        if self.args.trm_mode == "none":
            warnings.warn(message + "\nThe trm/ diagnostics would be wrong.", stacklevel=3)
        else:
            raise ValueError(message)

    # ------------------------------------------------------------------ rollout log-probs
    def _trm_topk_setup(self) -> None:
        """Checks and vLLM set-up for `trm_rollout_topk = k > 0`."""
        k = self._trm_topk
        if self.use_transformers_continuous_batching and self.rollout_func is None:
            raise ValueError(
                f"`trm_rollout_topk={k}` needs the rollout's top-k log-probs, which transformers continuous batching "
                "does not report. Use vLLM, plain transformers generation, or a `rollout_func` returning "
                "`topk_logprobs`/`topk_token_ids`."
            )
        if self.tools:
            raise ValueError(
                f"`trm_rollout_topk={k}` (trm_exact) does not support tool calling / `environment_factory` yet: "
                "multi-turn completions interleave tool tokens with several generation turns. Use `trm_mode='trm'`."
            )
        if self.use_vllm and self.rollout_func is None:
            # TRL builds VLLMGeneration with `logprobs=0` (sampled token only); its `generate` reads this attribute on
            # every call (server and colocate), so vLLM then returns the sampled token plus the top-k.
            self.vllm_generation.logprobs = k  # `_trm_check_vllm` then checks the engine's `max_logprobs` against it

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        turn = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if self.use_vllm and self._trm_topk > 0:
            return self._trm_vllm_topk_turn(turn)
        if not self._trm_capture or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(*turn)
        # Every generation turn (TRL's tool loop calls this once per turn) records its own log-probs, step by step.
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        with record_sampling_logprobs(unwrapped, topk=self._trm_topk) as recorder:
            completion_ids, logprobs = super()._generate_single_turn(*turn)
        if logprobs is None:
            logprobs = self._trm_recorded_logprobs(recorder, completion_ids)
        if logprobs is not None and recorder.topk_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
            self._trm_topk_stash = from_padded(recorder.topk_logprobs, recorder.topk_ids, lengths, self._trm_topk)
        return completion_ids, logprobs

    def _trm_recorded_logprobs(self, recorder, completion_ids: list[list[int]]) -> list[list[float]] | None:
        """One generation turn's per-token log-probs from the recorder, after checking that they belong to the
        completion tokens TRL received (same rows, same tokens). A turn that cannot be recorded (a non-sampling
        generation mode, or a `generate` that does not run transformers' sampler) is an error naming the cause with a
        TRM mode; with `trm_mode="none"` it warns once and returns None (no diagnostics)."""
        problem = None
        if recorder.problem is not None:
            problem = (
                f"`generate` ran in {recorder.problem} mode, which has no per-token sampling distribution, so there "
                "are no rollout log-probs (beam search scores are per beam, greedy decoding is deterministic). Use "
                "multinomial sampling: remove `num_beams` (or set `num_beams=1`) and keep `do_sample=True` in "
                "`generation_kwargs` (and in the model's `generation_config`)."
            )
        elif recorder.logprobs is None:
            if not completion_ids or not any(completion_ids):
                return [[] for _ in completion_ids]
            problem = (
                f"`model.generate` returned {len(completion_ids)} completions, but no token was sampled through "
                "transformers' decoding loop (`generate` is replaced or wrapped so that `GenerationMixin.generate` "
                "never runs, e.g. a mock returning fixed tokens), so their rollout log-probs are unknown. Call the "
                "model's own `generate`, or supply the log-probs with a `rollout_func`."
            )
        else:
            recorded = recorder.token_ids.cpu()  # (B, T_gen), one device-to-host copy
            if recorded.size(0) != len(completion_ids):
                problem = (
                    f"`model.generate` recorded {recorded.size(0)} sampled rows for {len(completion_ids)} completions "
                    "(`num_return_sequences` or a wrapped `generate` changed the rows), so the log-probs cannot be "
                    "matched to the completions. Leave `num_return_sequences` unset (TRL repeats prompts itself)."
                )
            else:
                for i, ids in enumerate(completion_ids):
                    if len(ids) > recorded.size(1) or recorded[i, : len(ids)].tolist() != list(ids):
                        problem = (
                            f"Completion {i} is not the token sequence that transformers sampled (a wrapped `generate` "
                            "changed the tokens), so its rollout log-probs are unknown. Return the sampled tokens "
                            "unchanged, or supply the log-probs with a `rollout_func`."
                        )
                        break
        if problem is None:
            recorded_logprobs = recorder.logprobs.cpu()  # (B, T_gen) float32
            return [recorded_logprobs[i, : len(ids)].tolist() for i, ids in enumerate(completion_ids)]
        if self.args.trm_mode != "none":
            raise ValueError(f"`trm_mode={self.args.trm_mode!r}` needs the rollout log-probs: {problem}")
        if not self._trm_warned_no_logprobs:
            warnings.warn(f"{problem} The trm/ diagnostics are skipped (trm_mode='none').", stacklevel=3)
            self._trm_warned_no_logprobs = True
        return None

    def _trm_vllm_topk_turn(self, turn: tuple):
        """vLLM with `logprobs=k`: TRL keeps `lp[0]`, which is then the most probable token's log-prob, not the sampled
        one's. Record what `VLLMGeneration.generate` returned and take the sampled token's log-prob by id."""
        engine = self.vllm_generation
        original, shadowed, returned = engine.generate, "generate" in vars(engine), []

        def generate(*args, **kwargs):
            returned.append(original(*args, **kwargs))
            return returned[-1]

        engine.generate = generate
        try:
            completion_ids, _ = super()._generate_single_turn(*turn)
        finally:
            if shadowed:
                engine.generate = original
            else:
                del engine.generate
        _, vllm_completion_ids, logprobs, logprob_token_ids = returned[-1]
        sampled, self._trm_topk_stash = from_vllm(vllm_completion_ids, logprobs, logprob_token_ids, self._trm_topk)
        return completion_ids, sampled

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
        if logprobs is not None and self.rollout_func is not None:
            check_rollout_logprobs(completion_ids, logprobs)
        if logprobs is not None:
            for i, (ids, lps) in enumerate(zip(completion_ids, logprobs, strict=True)):
                if len(ids) != len(lps):
                    raise ValueError(
                        f"Rollout log-probs do not match the completion: sequence {i} has {len(ids)} completion "
                        f"tokens but {len(lps)} log-probs. Return exactly one log-prob per completion token."
                    )
        if self._trm_topk > 0 and logprobs is None and self.rollout_func is None:  # trm_mode="none", warned above
            self._trm_topk_stash = None
        elif self._trm_topk > 0:
            if self.rollout_func is not None:  # popped: TRL would forward extra keys to the reward functions
                extra = result[5]
                topk = from_rollout_func(
                    extra.pop("topk_logprobs", None), extra.pop("topk_token_ids", None), completion_ids, self._trm_topk
                )
            else:
                topk, self._trm_topk_stash = self._trm_topk_stash, None
                if topk is None:
                    raise RuntimeError("trm_rollout_topk: the generation turn recorded no top-k log-probs.")
            for i, (ids, seq) in enumerate(zip(completion_ids, topk, strict=True)):
                if len(ids) != len(seq):
                    raise ValueError(
                        f"Rollout top-k does not match the completion: sequence {i} has {len(ids)} completion tokens "
                        f"but {len(seq)} top-k positions."
                    )
            self._trm_pending_topk = topk  # padded into the batch by `_generate_and_score_completions`
        return result

    # ------------------------------------------------------------------ mask
    def _trm_mask(
        self,
        per_token_logps: torch.Tensor,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        theta_topk: torch.Tensor | None,
        ratio_max: float | None,
    ) -> TrustRegionMaskOutput:
        """The mask of one batch over ``mask`` (B, T) (completion × tool mask). ``theta_topk`` (B, T, k + 1): log π_θ at
        the rollout top-k ids and the sampled token, from a :class:`~trl_trm.topk.FusedHeadCapture`; with it, the
        per-token KL enters as ``kl_tok`` (and its χ² lower bound as ``chi2_tok``). ``ratio_max``: `trm_ratio_max`
        resolved (the `"auto"` Seq-TIS clip replaced by this batch's C*)."""
        args = self.args
        sampling = inputs["sampling_per_token_logps"]
        kl_tok = chi2_tok = None
        if theta_topk is not None:
            topk_logprobs, topk_ids, topk_mask = (inputs[key] for key in BATCH_KEYS)
            roll_k, outcomes = rollout_topk_outcomes(
                topk_logprobs, topk_ids, topk_mask, sampling, inputs["completion_ids"]
            )  # (B, T, k + 1) each
            kl_tok = topk_token_kl(roll_k, theta_topk, outcomes)  # (B, T)
            chi2_tok = topk_token_chi2(roll_k, theta_topk, outcomes)  # (B, T)
        elif args.trm_mode == "trm_exact":
            raise ValueError(
                f"`trm_mode='trm_exact'` needs the rollout top-k in the batch ({list(BATCH_KEYS)}), which is missing: "
                "batches must come from `_generate_and_score_completions` with `trm_rollout_topk >= 1`."
            )
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
            ratio_max=ratio_max,
            kl_tok=kl_tok,
            delta_kl=args.trm_delta_kl,
            nonfinite=args.trm_nonfinite,
            chi2_tok=chi2_tok,
        )

    def _trm_evaluate(
        self,
        mask_logps: torch.Tensor,
        old_logps: torch.Tensor,
        inputs: dict[str, Any],
        theta_topk: torch.Tensor | None = None,
    ) -> tuple[TrustRegionMaskOutput, torch.Tensor]:
        """Mask (against ``mask_logps``, the policy the mask checks) and the (B, T) loss weights of the seeds'
        estimator (:func:`~trl_trm.masking.estimator_weights`, built from ``old_logps`` = π_old, the policy in the
        denominator of TRL's ratio), logged into the current window."""
        args = self.args
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        sampling = inputs["sampling_per_token_logps"]
        ratio_max = args.trm_ratio_max
        if ratio_max == "auto":
            ratio_max = self._trm_auto_clip(old_logps, sampling, mask)
        result = self._trm_mask(mask_logps, inputs, mask, theta_topk, ratio_max)
        weights = self._trm_weights(result, old_logps, sampling, mask, ratio_max)  # (B, T)
        result.token_weight_sum = weights.sum(dim=-1).to(result.token_weight_sum.dtype)  # what the loss multiplies
        self._trm_log(result, inputs.get("advantages"), mask)
        return result, weights

    def _trm_weights(
        self,
        result: TrustRegionMaskOutput,
        old_logps: torch.Tensor,
        sampling: torch.Tensor,
        mask: torch.Tensor,
        ratio_max: float | None,
    ) -> torch.Tensor:
        """(B, T) loss weights of one batch's mask: the seeds' estimator. The one place they are built, so a subclass
        that weights differently (e.g. `experiments/mismatch_study.py`'s emulation of TRL's `sequence_mask`) overrides
        this, and the `trm/token_weight` metric still reports what the loss multiplies."""
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

    def _trm_auto_clip(self, old_logps: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor) -> float:
        """`trm_ratio_max="auto"`: C* = sqrt(2 (1 + χ²_seq)) of this batch on every process (s_i = Σ_t log π_old/π_roll,
        the product ratio that Seq-TIS truncates), the same on every process; logged as `trm/seq_tis_clip`."""
        mode = "train" if self.model.training else "eval"
        log_w = torch.where(mask.bool(), old_logps.detach().double() - sampling.detach().double(), 0.0)  # (B, T)
        seq = self.accelerator.gather(log_w.sum(dim=-1))  # (num_processes * B,)
        clip = math.exp(seq_tis_auto_log_clip(seq))
        self._trm_window_clip[mode].append(clip)
        return clip

    def _trm_log(
        self, result: TrustRegionMaskOutput, advantages: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> None:
        """Gather the per-sequence statistics of every process into the logging window (reduced once, in `log`)."""
        mode = "train" if self.model.training else "eval"
        stats = result.sequence_stats()
        if advantages is not None:  # A_i, for the surrogate estimate (a per-token (B, T) advantage: its mean)
            if advantages.dim() == 2:
                valid = mask.to(advantages.dtype)
                advantages = (advantages * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)
            stats["advantage"] = advantages.detach()
        names = list(stats)
        local = torch.stack([stats[n].double() for n in names], dim=1)  # (B, K)
        gathered = self.accelerator.gather(local)  # (num_processes * B, K)
        self._trm_window[mode].append({n: gathered[:, j].cpu() for j, n in enumerate(names)})
        if self._trm_adaptive is not None and mode == "train":
            counted = gathered[:, names.index("length")] > 0
            self._trm_step_accept[0] += float(gathered[counted, names.index("keep")].sum())
            self._trm_step_accept[1] += float(counted.sum())
            self._metrics[mode]["trm/delta_max"].append(self._trm_adaptive.delta_max or float("nan"))
            self._metrics[mode]["trm/delta_avg"].append(self._trm_adaptive.delta_avg or float("nan"))

    def _trm_flush_window(self, mode: str) -> None:
        """Reduce the window's statistics once, each with the reduction its name states, into TRL's `_metrics` (one
        value per key, which TRL's `log` then reports unchanged)."""
        window, self._trm_window[mode] = self._trm_window[mode], []
        if window:
            names = [n for n in window[0] if all(n in entry for entry in window)]
            stats = {n: torch.cat([entry[n] for entry in window]) for n in names}
            # Per-token KLs from a top-k with k < V are lower bounds: their metrics end in `_lb`.
            lower_bound = self._trm_head_vocab is None or self._trm_topk < self._trm_head_vocab
            for key, value in summarize_mask_stats(stats, kl_tok_lower_bound=lower_bound).items():
                self._metrics[mode][key] = [value]
        short, valid = self._trm_window_topk[mode]
        if valid > 0:
            self._metrics[mode]["trm/topk_missing_frac"] = [short / valid]
        self._trm_window_topk[mode] = [0.0, 0.0]
        clips, self._trm_window_clip[mode] = self._trm_window_clip[mode], []
        if clips:
            self._metrics[mode]["trm/seq_tis_clip"] = [sum(clips) / len(clips)]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's `log`, after reducing the `trm/` window (every micro-batch, process and iteration since the last
        log) in one pass: a max is the window's max, a quartile is over the window's sequences."""
        self._trm_flush_window("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _trm_adapt(self) -> None:
        """At an optimizer-step boundary, move the thresholds toward the target using the step's global accept rate
        (identical on every process: it is computed from gathered statistics)."""
        kept, counted = self._trm_step_accept
        if counted > 0:
            self._trm_adaptive.update(kept / counted)
        self._trm_step_accept = [0.0, 0.0]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        pending, self._trm_pending_topk = self._trm_pending_topk, None
        if pending is not None:  # (B, T, k) tensors, right-padded like completion_ids; TRL splits/shuffles by row
            completion_ids = output["completion_ids"]
            output.update(pad_topk(pending, completion_ids.size(1), self._trm_topk, completion_ids.device))
            self._trm_log_topk_coverage(output)
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

    def _trm_log_topk_coverage(self, output: dict[str, Any]) -> None:
        """`trm/topk_missing_frac`: global fraction of valid completion tokens whose rollout top-k has fewer than
        min(k, V) entries (a `rollout_func` returning short lists); their KL uses the entries given."""
        mode = "train" if self.model.training else "eval"
        valid = output["completion_mask"].bool()  # (B, T)
        if "tool_mask" in output:
            valid = valid & output["tool_mask"].bool()
        vocab = getattr(self.model.config.get_text_config(), "vocab_size", None) or self._trm_topk
        short = (output[BATCH_KEYS[2]].sum(dim=-1) < min(self._trm_topk, vocab)) & valid  # (B, T)
        counts = self.accelerator.gather(torch.stack([short.sum(), valid.sum()]).float().unsqueeze(0)).sum(dim=0)
        self._trm_window_topk[mode][0] += float(counts[0])
        self._trm_window_topk[mode][1] += float(counts[1])

    def _trm_head_capture(self, inputs, attention_mask, logits_to_keep, batch_size) -> FusedHeadCapture | None:
        """A capture of π_θ for this forward, when the batch carries a rollout top-k to evaluate (at the top-k ids and
        the sampled token) or the sampler has processors to reproduce (at the sampled token, or with a top-k at both,
        all under the processors: `trl_trm.processors`)."""
        if inputs is None or "trm_weights" in inputs or "sampling_per_token_logps" not in inputs:
            return None
        processors = self._trm_processors
        if BATCH_KEYS[1] not in inputs and processors is None:
            return None
        completion_ids = inputs["completion_ids"]  # (B, T)
        if BATCH_KEYS[1] in inputs:
            ids = ids_with_sampled(inputs[BATCH_KEYS[1]], completion_ids)  # (B, T, k + 1)
        else:
            ids = completion_ids.unsqueeze(-1)  # (B, T, 1) the sampled token only
        prompt = inputs.get("prompt_ids") if processors is not None and processors.uses_context else None  # (B, P)
        return FusedHeadCapture(
            ids, completion_ids, attention_mask, logits_to_keep, batch_size, processors=processors, prompt_ids=prompt
        )

    def _trm_head_result(self, capture: FusedHeadCapture | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(theta_topk, processed_logps)``: (B, T, k + 1) log π_θ at the rollout top-k ids and the sampled token (or
        None), and (B, T) log π_θ of the sampled tokens under the sampler's processors (None when no processor beyond
        temperature is active: the loss forward's own log-probs are then already like with like)."""
        if capture is None:
            return None, None
        values = capture.result()  # (B, T, k + 1), or (B, T, 1) with processors and no top-k
        self._trm_head_vocab = capture.vocab_size
        if capture.processors is None:
            return values, None
        # The sampled token is the last id (`ids_with_sampled`); a top-k has k >= 1 more, processed like the rollout's.
        return (values if values.size(-1) > 1 else None), values[..., -1]  # (B, T, k + 1) or None, (B, T)

    @torch.no_grad()
    def _trm_generation_logps(self, output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logits_to_keep = output["completion_ids"].size(1)
        capture = self._trm_head_capture(output, attention_mask, logits_to_keep, batch_size)
        with capture or contextlib.nullcontext():
            logps, _, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size
            )
        theta_topk, processed = self._trm_head_result(capture)
        return (logps if processed is None else processed), theta_topk

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
        capture = self._trm_head_capture(inputs, attention_mask, logits_to_keep, batch_size)  # top-k / processors
        with capture or contextlib.nullcontext():
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *a, **kw
            )
        if inputs is None:
            return out
        theta_topk, processed = self._trm_head_result(capture)
        weights = self._trm_apply(out[0], inputs, theta_topk, processed)
        logps, entropies, *rest = out
        if weights is not None and entropies is not None:
            # The entropy bonus (`entropy_coef`, `use_adaptive_entropy`) of a zero-weight token (a rejected sequence,
            # a token_mis-masked token) must not move the policy: its entropy keeps its value (TRL's `entropy`
            # metric, the adaptive controller and `top_entropy_quantile` see the policy's entropy) but no gradient.
            entropies = torch.where(weights == 0, entropies.detach(), entropies)
        return (logps, entropies, *rest)

    def _trm_apply(
        self,
        per_token_logps: torch.Tensor,
        inputs: dict[str, Any],
        theta_topk: torch.Tensor | None = None,
        processed_logps: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
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
            old = inputs.get("trm_old_logps")
            if old is None:
                old = inputs.get("old_per_token_logps")
            if old is None:
                old = mask_logps.detach()
            _, weights = self._trm_evaluate(mask_logps, old, inputs, theta_topk)
        if self._trm_adaptive is not None and self.model.training and self.accelerator.sync_gradients:
            self._trm_adapt()  # after this micro-batch's mask: the new thresholds apply from the next step on
        if self.args.trm_mode == "none":
            return None
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        # Every TRL loss type is linear in the advantage with a non-negative factor, so scaling A by w >= 0 scales the
        # per-token policy loss (and its gradient) by w; the loss normaliser is untouched ("divide by N").
        inputs["advantages"] = advantages * weights.to(advantages.dtype)  # (B, T)
        if self.beta != 0.0 and "ref_per_token_logps" in inputs:
            # KL to the reference of a zero-weight token: ref := current (detached), zero in value and gradient.
            inputs["ref_per_token_logps"] = torch.where(
                weights != 0, inputs["ref_per_token_logps"], per_token_logps.detach()
            )
        return weights

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
