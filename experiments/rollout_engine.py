"""A rollout engine with a controlled rollout/training mismatch, as a TRL `rollout_func`.

TRL 1.16 calls ``rollout_func(prompts, trainer)`` once per generation batch (``GRPOTrainer._generate``) with the
process's prompts, already repeated ``num_generations`` times by TRL's sampler, and expects one completion per prompt:
``{"prompt_ids", "completion_ids", "logprobs"}`` (lists of token-id lists, and one sampling log-prob per completion
token). :class:`MismatchRollout` samples with its OWN copy of the policy (refreshed from the trainer's weights at
every call, like a vLLM weight sync) and reports the log-prob of the distribution it actually sampled from, as a
real inference engine does. Three kinds of mismatch, one at a time:

* ``precision``: the rollout copy runs in bf16; the trainer in fp32 (log-probs computed in fp32 from bf16 logits).
* ``impulse``: emulates MoE routing flips. At each position of each sequence, with probability ``impulse_p``, the
  rollout samples from a perturbed distribution, logits + ``impulse_sigma`` * N(0, 1) (i.i.d. per vocabulary entry),
  and REPORTS that distribution's log-prob. The trainer never sees the perturbation.
* ``flip``: emulates MoE routing flips as they occur in practice: a FIXED rare set of "fragile" contexts (a
  fraction ``flip_fraction`` of all (previous token, token before it) pairs, drawn once from ``seed``) where the
  rollout engine uses a very different distribution, logits + ``impulse_sigma`` * N(0, 1) with noise that is a
  deterministic function of the context (the same context always flips the same way, as a routing decision does).
  The engine counts the flipped positions (:attr:`MismatchRollout.flip_rate`).
* ``collapse``: support collapse in fragile contexts that decide the reward. Each prompt of the study's task asks for
  N characters; a fixed fraction ``collapse_fraction`` of the (class, N) prompts is fragile (drawn once from
  ``seed``). In a fragile prompt, at the first position where the answer has reached N characters (the context where
  the policy should end its answer), the engine puts ``collapse_mass`` on ``collapse_token`` (a token the trainer
  gives ~1e-3 or less, and the task's fatal token: the reward is 0 once it appears) and the rest on the policy's
  distribution, and reports that distribution's log-prob. :attr:`MismatchRollout.collapse_p_token` records the
  engine copy's own probability of the token at each visit (the trainer's, up to KV-cache rounding).
* ``stale``: the rollout samples with the weights of ``stale_k`` optimizer steps ago (the newest weights synced at or
  before that step; the oldest available during the first steps).
* ``none``: fp32 copy of the current weights, no perturbation: rollout log-probs equal the trainer's up to the
  rounding difference between incremental (KV-cache) decoding and the trainer's full forward (~1e-6).

With ``topk >= 1`` it also returns ``topk_logprobs`` / ``topk_token_ids`` (the sampling distribution's k most
probable tokens per completion token): the `rollout_func` contract of ``trm_mode="trm_exact"`` (``trl_trm.topk``).

Sampling is a plain KV-cache loop (:meth:`MismatchRollout._sample`; temperature from the trainer's config, no
top-k/top-p) with the perturbation as a logits processor; the reported log-prob is the log-softmax, at the sampled
token, of the processed scores, i.e. of the distribution sampled from. Prompts are tokenized with the
trainer's own ``_tokenize_prompts`` (a TRL private method) so the prompt ids equal what TRL would build.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

KINDS = ("none", "precision", "impulse", "flip", "stale", "collapse")


class _ImpulseNoise:
    """LogitsProcessor: with probability ``p`` per row and step, add ``sigma`` * N(0, 1) to that row's scores."""

    def __init__(self, p: float, sigma: float, generator: torch.Generator):
        self.p, self.sigma, self.generator = p, sigma, generator
        self.flips: list[torch.Tensor] = []  # (B,) bool per generated step: which rows were perturbed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(scores.size(0), generator=self.generator) < self.p  # (B,)
        self.flips.append(flip)
        if not bool(flip.any()):
            return scores
        noise = torch.randn(scores.shape, generator=self.generator).to(scores.dtype) * self.sigma  # (B, V)
        return torch.where(flip.unsqueeze(1).to(scores.device), scores + noise.to(scores.device), scores)


class _FragileContexts:
    """LogitsProcessor: rows whose last two tokens form a fragile context get context-seeded Gaussian logit noise.

    The fragile set is a (V, V) boolean table drawn once (``fraction`` of the pairs); the noise of context (a, b) is
    ``sigma`` * N(0, 1) from a generator seeded by (seed, a, b), so it is the same at every visit."""

    def __init__(self, fraction: float, sigma: float, vocab_size: int, seed: int):
        table_gen = torch.Generator().manual_seed(seed)
        self.fragile = torch.rand((vocab_size, vocab_size), generator=table_gen) < fraction  # (V, V): [prev2, prev1]
        self.sigma, self.seed, self.vocab_size = sigma, seed, vocab_size
        self.flips: list[torch.Tensor] = []  # (B,) bool per generated step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        prev1 = input_ids[:, -1].clamp(max=self.vocab_size - 1)  # (B,)
        prev2 = input_ids[:, -2].clamp(max=self.vocab_size - 1) if input_ids.size(1) > 1 else prev1  # (B,)
        flip = self.fragile[prev2.cpu(), prev1.cpu()]  # (B,)
        self.flips.append(flip)
        if not bool(flip.any()):
            return scores
        scores = scores.clone()
        for row in flip.nonzero().flatten().tolist():
            a, b = int(prev2[row]), int(prev1[row])
            gen = torch.Generator().manual_seed((self.seed * self.vocab_size + a) * self.vocab_size + b)
            noise = torch.randn(scores.size(-1), generator=gen) * self.sigma  # (V,)
            scores[row] = scores[row] + noise.to(scores.dtype).to(scores.device)
        return scores


class _SupportCollapse:
    """LogitsProcessor: in each row with a target (its prompt is fragile), at the first step where the answer's
    character count reaches the target, the sampling distribution becomes ``mass`` on ``token`` + (1 - mass) x the
    policy's, returned as log-probs (so it needs temperature 1)."""

    def __init__(self, targets: list[int | None], char_len: torch.Tensor, prompt_width: int, token: int, mass: float):
        self.targets = torch.tensor([t if t is not None else 2**62 for t in targets])  # (B,), "never" for safe rows
        self.char_len, self.prompt_width, self.token, self.mass = char_len, prompt_width, token, mass
        self.visited = torch.zeros(len(targets), dtype=torch.bool)  # (B,)
        self.flips: list[torch.Tensor] = []  # (B,) bool per generated step
        self.p_token: list[float] = []  # the policy's probability of `token` at each visit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        answer = input_ids[:, self.prompt_width :]  # (B, t) tokens generated so far (EOS and padding count 0 chars)
        count = self.char_len[answer].sum(-1) if answer.size(1) else torch.zeros_like(self.targets)  # (B,)
        hit = (count >= self.targets) & ~self.visited  # (B,)
        self.visited |= hit
        self.flips.append(hit)
        if not bool(hit.any()):
            return scores
        probs = torch.softmax(scores.float(), dim=-1)  # (B, V)
        self.p_token.extend(probs[hit, self.token].tolist())
        mixed = (1.0 - self.mass) * probs
        mixed[:, self.token] += self.mass
        return torch.where(hit.unsqueeze(1), mixed.log().to(scores.dtype), scores)


def fragile_prompt_target(text: str, fraction: float, seed: int) -> int | None:
    """The requested length N of a study prompt ("letters N" / "digits N") if that (class, N) is fragile, else None.
    The fragile set is fixed by ``seed``: each (class, N) is fragile with probability ``fraction``."""
    import random

    parts = text.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return int(parts[1]) if random.Random(f"{seed}-{parts[0]}-{parts[1]}").random() < fraction else None


class MismatchRollout:
    """TRL ``rollout_func`` sampling from a copy of the policy with a controlled mismatch (module docstring).

    Args:
        kind: one of :data:`KINDS`.
        impulse_p: probability per position of a perturbed step (``impulse``).
        impulse_sigma: standard deviation of the Gaussian logit noise at a perturbed step (``impulse`` and ``flip``).
        flip_fraction: fraction of all two-token contexts that are fragile (``flip``).
        stale_k: age in optimizer steps of the rollout weights (``stale``).
        collapse_fraction, collapse_token, collapse_mass: the fragile share of the prompts, the collapsed-onto token
            and its probability (``collapse``).
        topk: also return the top-k of the sampling distribution per token (for ``trm_exact``); 0 = off.
        seed: seed of the engine's own random generator (the perturbation); token sampling uses torch's global RNG,
            which the trainer seeds.
    """

    def __init__(
        self,
        kind: str = "none",
        *,
        impulse_p: float = 0.0,
        impulse_sigma: float = 0.0,
        flip_fraction: float = 0.0,
        stale_k: int = 0,
        topk: int = 0,
        seed: int = 0,
        collapse_fraction: float = 0.0,
        collapse_token: int = 3,
        collapse_mass: float = 0.95,
    ):
        if kind not in KINDS:
            raise ValueError(f"Unknown mismatch kind {kind!r}: choose one of {list(KINDS)}.")
        if not 0.0 <= impulse_p <= 1.0:
            raise ValueError(f"`impulse_p` must be a probability in [0, 1], got {impulse_p}.")
        if not 0.0 <= collapse_fraction <= 1.0 or not 0.0 < collapse_mass < 1.0:
            raise ValueError(
                f"`collapse_fraction` must lie in [0, 1] and `collapse_mass` in (0, 1), got {collapse_fraction}, "
                f"{collapse_mass}."
            )
        if not 0.0 <= flip_fraction <= 1.0:
            raise ValueError(f"`flip_fraction` must be a fraction in [0, 1], got {flip_fraction}.")
        if impulse_sigma < 0 or stale_k < 0 or topk < 0:
            raise ValueError(
                f"`impulse_sigma`, `stale_k` and `topk` must be >= 0, got {impulse_sigma}, {stale_k}, {topk}."
            )
        self.kind, self.impulse_p, self.impulse_sigma, self.stale_k, self.topk = (
            kind,
            impulse_p,
            impulse_sigma,
            stale_k,
            topk,
        )
        self.flip_fraction, self.seed = flip_fraction, seed
        self.collapse_fraction, self.collapse_token, self.collapse_mass = (
            collapse_fraction,
            collapse_token,
            collapse_mass,
        )
        self.collapse_p_token: list[float] = []  # the policy's probability of collapse_token at each fragile visit
        self.char_len: torch.Tensor | None = None  # (V,) characters per token (collapse), from set_tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        self._fragile: _FragileContexts | None = None
        self.flipped_tokens = 0  # completion tokens sampled from a perturbed distribution (impulse, flip), all calls
        self.sampled_tokens = 0  # completion tokens sampled, all calls
        self.sampled_sequences = 0  # completions sampled, all calls
        self.model: torch.nn.Module | None = None
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # optimizer step -> trainer weights (stale)
        self.weights_step: int | None = None  # the optimizer step whose weights the last rollout used
        self.last_flips: torch.Tensor | None = None  # (B, T) bool, perturbed positions of the last call

    @property
    def flip_rate(self) -> float:
        """Fraction of the completion tokens sampled so far (up to and including EOS) that were perturbed."""
        return self.flipped_tokens / self.sampled_tokens if self.sampled_tokens else 0.0

    # -------------------------------------------------------------------------------------------- weights
    def sync(self, policy: torch.nn.Module, step: int) -> None:
        """Refresh the rollout copy from ``policy`` (the trainer's model) at optimizer step ``step``."""
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        if self.model is None:
            # A fresh module from the config, not `copy.deepcopy(policy)`: TRL patches the trainer's model's
            # `forward` as an instance attribute bound to that model (its fused LM head), and a deep copy would keep
            # calling the original (fp32, current-weights) model.
            self.model = type(policy)(policy.config).eval()
            self.model.generation_config = copy.deepcopy(policy.generation_config)
            self.model.requires_grad_(False)
        use_step = step
        if self.kind == "stale":
            self.snapshots[step] = state
            older = [s for s in self.snapshots if s <= step - self.stale_k]  # syncs need not happen every step
            use_step = max(older) if older else min(self.snapshots)
            for old in [s for s in self.snapshots if s < use_step]:
                del self.snapshots[old]
            state = self.snapshots[use_step]
        self.model.float()
        self.model.load_state_dict(state)
        if self.kind == "precision":
            self.model.to(torch.bfloat16)
        self.weights_step = use_step

    # -------------------------------------------------------------------------------------------- sampling
    def set_tokenizer(self, tokenizer) -> None:
        """Characters per token id (``collapse`` counts the answer's characters); special tokens count 0."""
        special = set(tokenizer.all_special_ids)
        size = self.model.config.vocab_size if self.model is not None else len(tokenizer)
        lens = [0 if i in special else len(tokenizer.decode([i])) for i in range(size)]
        self.char_len = torch.tensor(lens)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        pad_id: int,
        eos_id: int,
        targets: list[int | None] | None = None,
    ) -> dict[str, Any]:
        """Sample one completion per prompt with the rollout copy; return TRL's rollout_func dict. ``targets``
        (``collapse``): per prompt, the character count at which its fragile context comes (None: not fragile)."""
        if self.model is None:
            raise RuntimeError("MismatchRollout.generate before sync(): no rollout weights yet.")
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # (B, P) left-padded
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        processors: list = []
        noise = None
        if self.kind == "impulse" and self.impulse_p > 0:
            noise = _ImpulseNoise(self.impulse_p, self.impulse_sigma, self.generator)
            processors.append(noise)
        if self.kind == "flip" and self.flip_fraction > 0:
            if self._fragile is None:  # the fixed fragile set, drawn once
                self._fragile = _FragileContexts(
                    self.flip_fraction, self.impulse_sigma, self.model.config.vocab_size, self.seed
                )
            noise = self._fragile
            noise.flips = []
            processors.append(noise)
        if self.kind == "collapse" and targets is not None:
            if temperature != 1.0 or self.char_len is None:
                raise ValueError("`collapse` needs temperature 1.0 and `set_tokenizer` first (characters per token).")
            noise = _SupportCollapse(targets, self.char_len, width, self.collapse_token, self.collapse_mass)
            processors.append(noise)
        sequences, logp_all = self._sample(
            input_ids, attention, processors, max_new_tokens, temperature, pad_id, eos_id
        )
        logp = logp_all.gather(-1, sequences.unsqueeze(-1)).squeeze(-1)  # (B, T)
        if noise is not None:
            self.last_flips = torch.stack(noise.flips, dim=1)  # (B, T)
        if isinstance(noise, _SupportCollapse):
            self.collapse_p_token.extend(noise.p_token)
        result: dict[str, Any] = {"prompt_ids": [list(p) for p in prompt_ids], "completion_ids": [], "logprobs": []}
        if self.topk:
            top_lp, top_ids = logp_all.topk(min(self.topk, logp_all.size(-1)), dim=-1)  # (B, T, k)
            result["topk_logprobs"], result["topk_token_ids"] = [], []
        for i in range(sequences.size(0)):
            row = sequences[i].tolist()
            n = row.index(eos_id) + 1 if eos_id in row else len(row)  # keep the EOS token, as TRL does
            result["completion_ids"].append(row[:n])
            self.sampled_tokens += n
            self.sampled_sequences += 1
            if noise is not None:
                self.flipped_tokens += int(self.last_flips[i, :n].sum())
            result["logprobs"].append(logp[i, :n].tolist())
            if self.topk:
                result["topk_logprobs"].append(top_lp[i, :n].tolist())
                result["topk_token_ids"].append(top_ids[i, :n].tolist())
        return result

    def _sample(self, input_ids, attention, processors, max_new_tokens, temperature, pad_id, eos_id):
        """Ancestral sampling with a KV cache: per step, logits (fp32) -> processors -> / temperature -> softmax ->
        one token from torch's global RNG; rows that emitted EOS get ``pad_id`` afterwards. Returns the completion
        ids (B, T) and the log-softmax of the distribution each token was sampled from (B, T, V). A plain loop
        instead of ``generate``: about half the time per step on this tiny model, whose cost is per-call overhead."""
        from transformers import DynamicCache

        model = self.model
        cache = DynamicCache()
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        position = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P) left padding: positions count real tokens
        step_ids, seq = input_ids, input_ids
        done = torch.zeros(input_ids.size(0), dtype=torch.bool)  # (B,)
        tokens, logps = [], []
        for _ in range(max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=position,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
            scores = out.logits[:, -1].float()  # (B, V)
            for processor in processors:
                scores = processor(seq, scores)
            logp = torch.log_softmax(scores / temperature, dim=-1)  # (B, V)
            cdf = logp.exp().cumsum(-1)  # (B, V); inverse-CDF sampling, much cheaper than multinomial here
            token = (
                torch.searchsorted(cdf, torch.rand(cdf.size(0), 1) * cdf[:, -1:])
                .squeeze(-1)
                .clamp(max=cdf.size(-1) - 1)
            )
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens.append(token)
            logps.append(logp)
            done = done | (token == eos_id)
            if bool(done.all()):
                break
            step_ids = token.unsqueeze(-1)  # (B, 1)
            seq = torch.cat([seq, step_ids], dim=-1)
            attention = torch.cat([attention, torch.ones_like(step_ids)], dim=-1)
            position = position[:, -1:] + 1
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)  # (B, T), (B, T, V)

    # -------------------------------------------------------------------------------------------- TRL seam
    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        args = trainer.args
        if args.top_k not in (None, 0) or args.top_p != 1.0:
            raise ValueError("MismatchRollout samples without top-k/top-p: set `top_k=None` (or 0) and `top_p=1.0`.")
        policy = trainer.accelerator.unwrap_model(trainer.model)
        self.sync(policy, trainer.state.global_step)
        prompt_ids = trainer._tokenize_prompts(prompts)[0]  # exactly TRL's prompt ids
        tok = trainer.processing_class
        targets = None
        if self.kind == "collapse":
            if self.char_len is None:
                self.set_tokenizer(tok)
            texts = [p[-1]["content"] if isinstance(p, list) else str(p) for p in prompts]
            targets = [fragile_prompt_target(t, self.collapse_fraction, self.seed) for t in texts]
        return self.generate(
            prompt_ids,
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            targets=targets,
        )
