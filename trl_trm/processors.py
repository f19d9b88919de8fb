"""The rollout sampler's logit processors, reproduced on π_θ's logits: samplers compared like with like.

Rollout log-probs are "processed": the log-softmax of the logits after the sampler's processors (repetition penalty,
temperature, top-k, top-p, min-p), i.e. of a truncated, renormalised distribution. TRL's loss forward scores the
temperature-scaled distribution only, so with `top_k=20` two identical engines disagree on every token. For the mask,
the statistics and the ρ factor, :class:`SamplerProcessors` re-applies the same processors to π_θ's logits (no
gradient), one chunk of rows at a time (:func:`trl_trm.topk.head_logprobs_at`).

Two engines, two orders (each reproduced exactly, see `docs/samplers.md`):

* ``"transformers"`` (`model.generate`, `transformers.generation.logits_process`): repetition penalty,
  suppressed tokens, temperature, top-k, top-p, min-p.
* ``"vllm"`` (vLLM's v1 `Sampler`, 0.10 and later): repetition penalty, temperature, min-p, then top-k and top-p
  in one pass over the sorted logits. min-p before top-p gives a different kept set than top-p before min-p.

Anything else that changes the sampling distribution (typical-p, epsilon/eta cutoffs, n-gram bans, bad words,
presence/frequency penalties, logit bias, structured outputs, custom logits processors, ...) is refused by name:
:meth:`SamplerProcessors.from_config` raises ``ValueError``.

Everything here is pure torch; :func:`sampler_for_trainer` reads a trainer's attributes without importing TRL.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ENGINES = ("transformers", "vllm")

# --- what each engine's settings do to the sampling distribution -------------------------------------------------
HANDLED_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
"""Sampler settings reproduced on π_θ (GRPOConfig fields, overridable through `generation_kwargs`)."""

TRANSFORMERS_REFUSED = {
    "typical_p": lambda v: v is not None and v < 1.0,
    "epsilon_cutoff": lambda v: v is not None and 0.0 < v < 1.0,
    "eta_cutoff": lambda v: v is not None and 0.0 < v < 1.0,
    "top_h": lambda v: v is not None,
    "no_repeat_ngram_size": lambda v: v is not None and v > 0,
    "encoder_no_repeat_ngram_size": lambda v: v is not None and v > 0,
    "encoder_repetition_penalty": lambda v: v is not None and v != 1.0,
    "bad_words_ids": lambda v: v is not None,
    "sequence_bias": lambda v: v is not None,
    "min_length": lambda v: v is not None and v > 0,
    "min_new_tokens": lambda v: v is not None and v > 0,
    "forced_bos_token_id": lambda v: v is not None,
    "forced_eos_token_id": lambda v: v is not None,
    "begin_suppress_tokens": lambda v: v is not None,
    "exponential_decay_length_penalty": lambda v: v is not None,
    "guidance_scale": lambda v: v is not None and v != 1,
    "watermarking_config": lambda v: v is not None,
    "num_beams": lambda v: v is not None and v > 1,
    "penalty_alpha": lambda v: v is not None and v > 0,
    "logits_processor": lambda v: v is not None and len(v) > 0,
    "prefix_allowed_tokens_fn": lambda v: v is not None,
    "do_sample": lambda v: v is False,
}
"""transformers generation settings that change the sampling distribution and are not reproduced: refused when the
predicate is true (i.e. when the setting is active). Other keys (`max_new_tokens`, `stop_strings`, `cache_*`,
`renormalize_logits`, a log-softmax, ...) do not change the per-token distribution; `suppress_tokens` is reproduced.
The trainer checks the settings `generate` will use (TRL's merged with the model's `generation_config`)."""

VLLM_HARMLESS_KEYS = frozenset(
    {
        "n", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "logprobs", "prompt_logprobs",
        "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
        "output_kind", "truncate_prompt_tokens", "flat_logprobs", "skip_clone",
    }
)  # fmt: skip
"""vLLM `SamplingParams` keys that do not change the per-token sampling distribution."""

VLLM_REFUSED = {
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "min_tokens": lambda v: v not in (None, 0),
    "bad_words": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
    "allowed_token_ids": lambda v: v is not None,
    "logits_processors": lambda v: bool(v),
    "structured_outputs": lambda v: v is not None,
    "guided_decoding": lambda v: v is not None,
    "extra_args": lambda v: bool(v),
}
"""vLLM `SamplingParams` keys that change the sampling distribution and are not reproduced: refused when active."""

PROCESSOR_CHUNK_ELEMENTS = 1 << 22
"""Most logits one processed block holds (16 MiB in float32): sorting (top-p) needs several (N, V) temporaries,
among them int64 indices, so the block is a quarter of :data:`trl_trm.lm_head.HEAD_CHUNK_ELEMENTS`."""


def _refusal(setting: str, value: Any, engine: str) -> str:
    what = "vLLM" if engine == "vllm" else "transformers `generate`"
    return (
        f"`{setting}={value!r}` changes {what}'s sampling distribution, and TRMTrainer cannot reproduce it on the "
        "training policy's log-probs, so the rollout and training log-probs would not be comparable (every token "
        f"would read as a mismatch). Remove `{setting}` from `generation_kwargs`"
        + (" or the model's `generation_config.json`" if engine == "transformers" else "")
        + " (reproduced: temperature, top_k, top_p, min_p, repetition_penalty; see docs/samplers.md)."
    )


def _as_float(value: Any, default: float) -> float:
    return default if value is None else float(value)


@dataclass(frozen=True)
class SamplerProcessors:
    """The sampler's logit processors, applied to (N, V) logits exactly as the rollout engine applies them.

    Args:
        engine: ``"transformers"`` or ``"vllm"``: selects the order and the engine's floating-point details.
        temperature: divides the (penalised) logits.
        top_k: keep the tokens at least as probable as the k-th (ties kept); 0 = off.
        top_p: keep the smallest set of most probable tokens with mass >= top_p; 1 = off.
        min_p: keep the tokens with probability >= min_p · max probability; 0 = off.
        repetition_penalty: a logit z of a token already in the context (prompt, left padding excluded, and
            the completion so far) becomes z / penalty if z > 0, else z · penalty (CTRL); 1 = off.
        suppress_tokens: token ids set to -inf (transformers' `suppress_tokens`).
        min_tokens_to_keep: transformers' truncation floor (1 when sampling without beams).
        reference_temperature: the temperature of TRL's loss forward (`GRPOConfig.temperature`); with nothing else
            active and ``temperature`` equal to it, there is nothing to reproduce (:attr:`active` is False).
    """

    engine: str = "transformers"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()
    min_tokens_to_keep: int = 1
    reference_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"Unknown sampler engine {self.engine!r}: expected one of {ENGINES}.")
        if not self.temperature > 0:
            raise ValueError(
                f"`temperature={self.temperature}` must be > 0 for sampling: the processed log-probs of greedy "
                "decoding are not defined. Use a positive temperature."
            )
        if self.top_k < 0:
            raise ValueError(f"`top_k={self.top_k}` must be >= 0 (0 = off).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p={self.top_p}` must be in (0, 1] (1 = off).")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"`min_p={self.min_p}` must be in [0, 1] (0 = off).")
        if not self.repetition_penalty > 0:
            raise ValueError(f"`repetition_penalty={self.repetition_penalty}` must be > 0 (1 = off).")

    # ------------------------------------------------------------------ description
    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p, min-p or suppressed tokens cut tokens out of the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or bool(self.suppress_tokens)

    @property
    def uses_context(self) -> bool:
        """Whether the processed logits depend on the context tokens (the repetition penalty)."""
        return self.repetition_penalty != 1.0

    @property
    def active(self) -> bool:
        """False when only the loss forward's own temperature is active: nothing to reproduce."""
        return self.truncates or self.uses_context or self.temperature != self.reference_temperature

    def describe(self) -> str:
        parts = [f"temperature={self.temperature:g}"]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition_penalty={self.repetition_penalty:g}")
        if self.top_k > 0:
            parts.append(f"top_k={self.top_k}")
        if self.top_p < 1.0:
            parts.append(f"top_p={self.top_p:g}")
        if self.min_p > 0.0:
            parts.append(f"min_p={self.min_p:g}")
        if self.suppress_tokens:
            parts.append(f"suppress_tokens={list(self.suppress_tokens)}")
        return f"{self.engine}: " + ", ".join(parts)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(
        cls,
        settings: Mapping[str, Any],
        engine: str = "transformers",
        reference_temperature: float = 1.0,
        structured_outputs_regex: str | None = None,
    ) -> SamplerProcessors | None:
        """From effective generation settings (a dict: GRPOConfig's sampler fields updated with
        `generation_kwargs`, or a transformers `GenerationConfig.to_dict()`).

        Returns:
            The processors, or None when nothing beyond the loss forward's own temperature is active.

        Raises:
            ValueError: naming the first setting that changes the sampling distribution and is not reproduced.
        """
        if engine not in ENGINES:
            raise ValueError(f"Unknown sampler engine {engine!r}: expected one of {ENGINES}.")
        if engine == "vllm":
            if structured_outputs_regex is not None:
                raise ValueError(_refusal("vllm_structured_outputs_regex", structured_outputs_regex, engine))
            refused, harmless = VLLM_REFUSED, VLLM_HARMLESS_KEYS
        else:
            refused, harmless = TRANSFORMERS_REFUSED, None
        for key, value in settings.items():
            if key in refused:
                if refused[key](value):
                    raise ValueError(_refusal(key, value, engine))
            elif harmless is not None and key not in harmless and key not in HANDLED_KEYS:
                raise ValueError(
                    f"`generation_kwargs[{key!r}]`: TRMTrainer cannot tell whether this vLLM sampling setting changes "
                    "the sampling distribution, so it cannot promise comparable rollout and training log-probs. "
                    f"Remove it (known settings: {sorted(HANDLED_KEYS)} are reproduced, {sorted(harmless)} do not "
                    "change the distribution; see docs/samplers.md)."
                )
        top_k = settings.get("top_k")
        top_k = 0 if top_k is None or int(top_k) < 0 else int(top_k)  # vLLM: -1 (older) and 0 mean off
        suppress = settings.get("suppress_tokens") if engine == "transformers" else None
        processors = cls(
            engine=engine,
            temperature=_as_float(settings.get("temperature"), 1.0),
            top_k=top_k,
            top_p=_as_float(settings.get("top_p"), 1.0),
            min_p=_as_float(settings.get("min_p"), 0.0),
            repetition_penalty=_as_float(settings.get("repetition_penalty"), 1.0),
            suppress_tokens=tuple(int(t) for t in (suppress or ())),
            reference_temperature=float(reference_temperature),
        )
        return processors if processors.active else None

    @classmethod
    def from_config(cls, args: Any, engine: str | None = None) -> SamplerProcessors | None:
        """From a `GRPOConfig`: its `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`, updated with
        `generation_kwargs` (as TRL does for both engines), and, for vLLM, `vllm_structured_outputs_regex`.

        Args:
            args: the config. engine: ``"transformers"`` or ``"vllm"``; default: ``"vllm"`` when `args.use_vllm`.

        Returns:
            The processors, or None when only the loss forward's temperature is active.

        Raises:
            ValueError: naming a setting that changes the sampling distribution and is not reproduced.
        """
        engine = engine or ("vllm" if getattr(args, "use_vllm", False) else "transformers")
        settings = {key: getattr(args, key, None) for key in HANDLED_KEYS}
        generation_kwargs = getattr(args, "generation_kwargs", None) or {}
        if not isinstance(generation_kwargs, Mapping):
            raise ValueError(f"`generation_kwargs` must be a dict, got {type(generation_kwargs).__name__}.")
        settings.update(generation_kwargs)
        return cls.from_settings(
            settings,
            engine,
            reference_temperature=_as_float(getattr(args, "temperature", None), 1.0),
            structured_outputs_regex=getattr(args, "vllm_structured_outputs_regex", None)
            if engine == "vllm"
            else None,
        )

    # ------------------------------------------------------------------ application
    def process(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Processed logits, (N, V) float32: what the engine samples from (removed tokens are -inf).

        Args:
            logits: (N, V) the model's logits (after its own soft-capping / scaling, before temperature).
            seen: (N, V) bool, True where the token occurs in the row's context (needed with a repetition penalty;
                :func:`context_mask` / :func:`first_occurrence`).
        """
        if logits.dim() != 2:
            raise ValueError(f"`logits` must be (N, V), got shape {tuple(logits.shape)}.")
        z = logits.float()  # (N, V)
        if self.uses_context:
            if seen is None or seen.shape != z.shape:
                raise ValueError(
                    f"`repetition_penalty={self.repetition_penalty}` needs the (N, V) context mask `seen`, got "
                    f"{None if seen is None else tuple(seen.shape)} for logits {tuple(z.shape)}."
                )
            penalised = torch.where(z < 0, z * self.repetition_penalty, z / self.repetition_penalty)
            z = torch.where(seen, penalised, z)
        if self.suppress_tokens:
            z = z.index_fill(-1, torch.tensor(self.suppress_tokens, device=z.device), -math.inf)
        if self.temperature != 1.0:
            z = z / self.temperature
        if self.engine == "transformers":
            return self._truncate_transformers(z)
        return self._truncate_vllm(z)

    def _truncate_transformers(self, z: torch.Tensor) -> torch.Tensor:
        """transformers' `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`, in that order."""
        vocab, keep_min = z.size(-1), self.min_tokens_to_keep
        if self.top_k > 0:
            k = min(max(self.top_k, keep_min), vocab)
            z = z.masked_fill(z < torch.topk(z, k)[0][..., -1, None], -math.inf)
        if self.top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(z, descending=False)  # (N, V) ascending
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative <= (1 - self.top_p)
            remove_sorted[..., -keep_min:] = 0
            remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
            z = z.masked_fill(remove, -math.inf)
        if self.min_p > 0.0:
            probs = torch.softmax(z, dim=-1)  # (N, V)
            remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
            remove.scatter_(-1, torch.topk(probs, min(keep_min, vocab), dim=-1).indices, False)
            z = z.masked_fill(remove, -math.inf)
        return z

    def _truncate_vllm(self, z: torch.Tensor) -> torch.Tensor:
        """vLLM v1: min-p (an argmax-invariant logits processor), then `apply_top_k_top_p`."""
        n, vocab = z.shape
        if self.min_p > 0.0:
            probs = torch.softmax(z, dim=-1)  # (N, V)
            min_p = torch.full((n, 1), self.min_p, dtype=torch.float32, device=z.device)
            z = z.masked_fill(probs < probs.amax(dim=-1, keepdim=True).mul_(min_p), -math.inf)
        k = min(self.top_k, vocab) if self.top_k > 0 else 0
        if self.top_p >= 1.0:
            if k == 0 or k == vocab:
                return z
            return z.masked_fill(z < z.topk(k, dim=1).values[:, k - 1 : k], -math.inf)
        sorted_logits, sorted_indices = z.sort(dim=-1, descending=False)  # (N, V) ascending
        if 0 < k < vocab:
            kth = sorted_logits[:, vocab - k : vocab - k + 1]  # (N, 1) the k-th largest value
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        top_p = torch.full((n, 1), self.top_p, dtype=torch.float32, device=z.device)
        remove = cumulative <= 1 - top_p  # (N, V)
        remove[:, -1] = False  # at least one token
        sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
        return z.scatter(-1, sorted_indices, sorted_logits)

    def logprobs(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(N, V) float32 processed log-probs: log-softmax of :meth:`process` (-inf for removed tokens)."""
        return torch.log_softmax(self.process(logits, seen), dim=-1)

    def logprobs_at(self, logits: torch.Tensor, ids: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) float32 processed log-probs at ``ids`` (N, K) long."""
        return self.logprobs(logits, seen).gather(-1, ids.long())


# ---------------------------------------------------------------------- context of the repetition penalty
def context_mask(
    context_ids: torch.Tensor, vocab_size: int, context_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, V) bool: which tokens occur in each row's context.

    Args:
        context_ids: (N, C) long token ids (ids >= V are ignored, as transformers does).
        vocab_size: V.
        context_valid: (N, C) bool, False for slots that are not context (e.g. left padding); default all True.
    """
    ids = context_ids.long().clamp(min=0, max=vocab_size)  # (N, C); V is a spill column
    if context_valid is not None:
        ids = ids.masked_fill(~context_valid.bool(), vocab_size)
    seen = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]


def first_occurrence(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """(B, V) long: per sequence and token, -1 if the token is in the prompt (attention 1: left padding excluded),
    else the first completion position where it occurs, else T. Token v is in the context of completion position t
    exactly when ``first[b, v] < t``: O(B·V) memory for all B·T positions.

    Args:
        prompt_ids: (B, P).
        prompt_mask: (B, P).
        completion_ids: (B, T).
        vocab_size: V (ids >= V are ignored).
    """
    batch, length = completion_ids.shape
    device = completion_ids.device
    first = torch.full((batch, vocab_size + 1), length, dtype=torch.long, device=device)  # (B, V + 1)
    positions = torch.arange(length, device=device).expand(batch, length)  # (B, T)
    first.scatter_reduce_(1, completion_ids.long().clamp(0, vocab_size), positions, reduce="amin")
    prompt = prompt_ids.to(device).long().clamp(0, vocab_size).masked_fill(~prompt_mask.to(device).bool(), vocab_size)
    first.scatter_(1, prompt, -1)
    return first[:, :vocab_size]


# ---------------------------------------------------------------------- trainer start-up
def sampler_for_trainer(trainer: Any) -> SamplerProcessors | None:
    """The processors a `TRMTrainer` must reproduce, checked at start-up; None when nothing is to reproduce.

    Reads the trainer's attributes (no TRL import). On the plain transformers path the settings are those `generate`
    will actually use: TRL's `generation_config` merged with the model's own `generation_config` (values TRL leaves
    unset, e.g. `min_p=None`, come from the model), the same merge `generate` does. A `rollout_func` is assumed to
    sample like the engine the config names (vLLM with `use_vllm`, else transformers), as docs/samplers.md states.

    Raises:
        ValueError: a setting that is not reproduced, or processors with tool calling (`trm_mode != "none"`; with
            `"none"` it warns and returns None: only diagnostics would be affected).
    """
    args = trainer.args
    try:
        processors = SamplerProcessors.from_config(args)
        engine = "vllm" if getattr(trainer, "use_vllm", False) else "transformers"
        generation_config = getattr(trainer, "generation_config", None)
        if (
            engine == "transformers"
            and getattr(trainer, "rollout_func", None) is None
            and generation_config is not None
        ):
            effective = _effective_generation_config(trainer, generation_config)
            processors = SamplerProcessors.from_settings(
                effective, "transformers", reference_temperature=_as_float(args.temperature, 1.0)
            )
        if processors is not None and getattr(trainer, "tools", None):
            raise ValueError(
                f"The sampler settings ({processors.describe()}) are reproduced on the training policy, but not with "
                "tool calling / `environment_factory`: multi-turn completions interleave tool tokens with several "
                "generation turns. Use temperature-only sampling (top_k=0, top_p=1, min_p=None, "
                "repetition_penalty=1) with tools."
            )
    except ValueError as err:
        if getattr(args, "trm_mode", None) == "none":
            warnings.warn(f"{err} The trm/ diagnostics would be wrong.", stacklevel=3)
            return None
        raise
    return processors


def _effective_generation_config(trainer: Any, generation_config: Any) -> dict[str, Any]:
    """The settings `model.generate(generation_config=...)` uses, as a dict (transformers' own merge)."""
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is None:
        return generation_config.to_dict()
    merged, _ = prepare(generation_config)
    settings = merged.to_dict()
    settings.update({key: getattr(merged, key, None) for key in (*HANDLED_KEYS, *TRANSFORMERS_REFUSED)})
    return settings
