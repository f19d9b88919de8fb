"""MoE routing: the experts the rollout chose, recorded; their disagreement with the training forward, measured; and
rollout routing replay (R3), which forces them in the training forward.

transformers 5 routes most MoE architectures through one ``*TopKRouter`` module whose forward returns
``(router_logits, router_scores, router_indices)`` for the flattened (B·S, H) hidden states, shapes (N, E), (N, k),
(N, k). Forward hooks on those modules:

* :class:`RouteRecorder` (during `generate`): each forward's (N, k) indices, reshaped to (B, S, k): the prefill
  covers the prompt, each decoding step one token. Result: (B, P_pad + steps, L, k) int16 (O(B·T·L·k)).
* :class:`RouteForcer` (training forwards): records the training forward's own indices and, with replay, returns the
  recorded ones instead, with the scores recomputed from the same forward's router logits over those experts, as the
  architecture computes them (so the gate weights stay differentiable). A position without a recorded route (-1:
  the last sampled token, which `generate` never feeds back) keeps its own routing; it predicts nothing that is
  scored.

Routes travel with the batch as (B, P + C, L, k) int16 ``trm_routes`` (prompt left-padded, completion right-padded,
-1 where nothing was recorded); TRL splits and shuffles them by row like every other batch tensor.

A completion token's log-prob is computed at the position before it (the last prompt token for the first completion
token). Its routing disagrees when, at that position, the expert set of at least one layer differs between the
rollout and the training forward (:func:`disagreement`).
"""

from __future__ import annotations

from typing import Any

import torch

from .moe import router_modules

# Architectures whose router scores this module recomputes over forced experts, by router class name:
# "softmax": softmax over all experts (float32), gathered at the experts, renormalised when the router's
#   `norm_topk_prob` is set, cast back to the logits' dtype (Qwen2-MoE, Qwen3-MoE, OLMoE);
# "softmax_norm": the same, always renormalised, left in float32 (Mixtral);
# "topk_softmax": softmax over the chosen experts' logits only (GPT-OSS).
REPLAY_ROUTERS = {
    "Qwen2MoeTopKRouter": "softmax",
    "Qwen3MoeTopKRouter": "softmax",
    "OlmoeTopKRouter": "softmax",
    "MixtralTopKRouter": "softmax_norm",
    "GptOssTopKRouter": "topk_softmax",
}
ROUTES_KEY = "trm_routes"


def replay_scores(router: torch.nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(N, k) gate weights of ``indices`` computed from the (N, E) ``logits`` as ``router``'s architecture does."""
    kind = REPLAY_ROUTERS[type(router).__name__]
    if kind == "topk_softmax":
        chosen = logits.gather(1, indices)  # (N, k)
        return torch.softmax(chosen, dim=1, dtype=chosen.dtype)
    probs = (
        torch.softmax(logits, dim=-1, dtype=torch.float) if kind == "softmax" else torch.softmax(logits.float(), -1)
    )
    scores = probs.gather(1, indices)  # (N, k)
    if kind == "softmax_norm" or getattr(router, "norm_topk_prob", False):
        scores = scores / scores.sum(dim=-1, keepdim=True)
    return scores.to(logits.dtype) if kind == "softmax" else scores


def replay_problem(model: torch.nn.Module) -> str | None:
    """None when every router of ``model`` can be replayed, else a one-line reason naming the router class."""
    routers = router_modules(model)
    if not routers:
        return "the model has no `*TopKRouter` module (not a transformers 5 MoE model)"
    unsupported = sorted({type(r).__name__ for r in routers} - set(REPLAY_ROUTERS))
    if unsupported:
        return f"routing replay does not support the router {', '.join(unsupported)} (supported: {sorted(REPLAY_ROUTERS)})"
    return None


class RouteRecorder:
    """Context manager: the experts chosen by every router call of ``model`` during one `generate`.

    Call :meth:`routes` with the generation batch size afterwards: (B, P_pad + steps, L, k) int16."""

    def __init__(self, model: torch.nn.Module):
        self.routers = router_modules(model)
        self.calls: list[torch.Tensor] = []  # (N, k) int16, in call order: L calls per forward
        self._handles: list[Any] = []
        self.problem: str | None = None  # why :meth:`routes` returned None although calls were recorded

    def __enter__(self) -> RouteRecorder:
        def hook(_m, _i, out):
            self.calls.append(out[2].detach().to(torch.int16))

        self._handles = [r.register_forward_hook(hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def routes(self, batch: int) -> tuple[torch.Tensor, int] | None:
        """(B, S_total, L, k) int16 routes of the recorded forwards and the first forward's (the prefill's) width,
        or None when nothing was recorded."""
        layers = len(self.routers)
        if not self.calls or len(self.calls) % layers or self.calls[0].size(0) % batch:
            return None
        if any(c.size(0) != batch for c in self.calls[layers:]):  # a decode step fed more than one token per row
            self.problem = (
                "a generation step after the prefill ran more than one token per row (generation without the KV "
                "cache, e.g. `use_cache=False` in `generation_kwargs`, re-runs the whole sequence), so the routes "
                "cannot be laid out per token"
            )
            return None
        forwards = []
        for f in range(0, len(self.calls), layers):
            per_layer = [c.reshape(batch, -1, c.size(-1)) for c in self.calls[f : f + layers]]  # L x (B, S_f, k)
            forwards.append(torch.stack(per_layer, dim=2))  # (B, S_f, L, k)
        return torch.cat(forwards, dim=1), forwards[0].size(1)


def per_sample_routes(
    routes: torch.Tensor, prompt_width: int, prompt_lengths: list[int], completion_lengths: list[int]
) -> list[torch.Tensor]:
    """One (P_i + C_i, L, k) int16 tensor per row from `generate`'s (B, prompt_width + steps, L, k) routes (prompts
    left-padded to ``prompt_width``); completion positions `generate` never fed back are -1."""
    out = []
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        row = routes.new_full((p + c, *routes.shape[2:]), -1)  # (P_i + C_i, L, k)
        recorded = routes[i, prompt_width - p : prompt_width + c]  # up to P_i + C_i positions
        row[: recorded.size(0)] = recorded
        out.append(row)
    return out


def pad_routes(rows: list[torch.Tensor], prompt_lengths: list[int], prompt_width: int, width: int) -> torch.Tensor:
    """(B, width, L, k) int16 batch layout: row i's prompt part ends at ``prompt_width`` (left padding), its completion
    follows (right padding); -1 elsewhere."""
    shape = rows[0].shape[1:]
    out = rows[0].new_full((len(rows), width, *shape), -1)
    for i, (row, p) in enumerate(zip(rows, prompt_lengths, strict=True)):
        n = min(row.size(0), width - (prompt_width - p))
        out[i, prompt_width - p : prompt_width - p + n] = row[:n]
    return out


def disagreement(
    rollout: torch.Tensor, trained: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion token, whether the experts at the position that predicts it differ between the rollout and the
    training forward.

    Args:
        rollout, trained: (B, P + C, L, k) routes (-1: not recorded).
        completion_mask: (B, C) 1 for the completion tokens to count.

    Returns:
        (B, C) bool: at least one layer's expert set differs; (B, C, L) bool: per layer. Positions without a
        recorded route count as agreeing, and are not counted (``completion_mask`` is the caller's to narrow).
    """
    c = completion_mask.size(1)
    width = rollout.size(1)
    rolled = rollout[:, width - c - 1 : width - 1].sort(dim=-1).values  # (B, C, L, k) positions predicting tokens
    own = trained[:, width - c - 1 : width - 1].to(rolled.dtype).sort(dim=-1).values
    recorded = (rolled >= 0).all(dim=-1)  # (B, C, L)
    per_layer = (rolled != own).any(dim=-1) & recorded & completion_mask.bool().unsqueeze(-1)  # (B, C, L)
    return per_layer.any(dim=-1), per_layer


def counted_tokens(rollout: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: completion tokens whose predicting position has a recorded rollout route in every layer."""
    c = completion_mask.size(1)
    width = rollout.size(1)
    rec = (rollout[:, width - c - 1 : width - 1] >= 0).all(dim=-1).all(dim=-1)  # (B, C)
    return rec & completion_mask.bool()


class RouteForcer:
    """Persistent forward hooks on ``model``'s routers for the training forwards.

    :meth:`arm` gives the routes of the next forward's rows (B, S, L, k); each router call then takes the next N of
    that layer's B·S positions (chunked forwards consume them in order; a call past the end starts over, which is
    the backward's recomputation under gradient checkpointing: TRL's loss forward is one chunk). The hook records
    the forward's own indices of the first pass (``own``: (B, S, L, k)) and, when ``replay`` is set, returns the
    armed indices (own ones where -1) with the scores recomputed over them. :meth:`disarm` stops both."""

    def __init__(self, model: torch.nn.Module, replay: bool):
        self.routers = router_modules(model)
        self.layer = {id(r): i for i, r in enumerate(self.routers)}
        self.replay = replay
        self._routes: torch.Tensor | None = None  # (L, B·S, k) int16
        self._offset = [0] * len(self.routers)
        self._own: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._done = [False] * len(self.routers)
        self._shape: tuple[int, int] = (0, 0)
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def arm(self, routes: torch.Tensor) -> None:
        b, s, layers, k = routes.shape
        if layers != len(self.routers):
            raise ValueError(f"recorded routes have {layers} layers, the model has {len(self.routers)} routers")
        self._routes = routes.permute(2, 0, 1, 3).reshape(layers, b * s, k)  # int16, widened per call in the hook
        self._shape = (b, s)
        self._offset = [0] * layers
        self._own = [[] for _ in self.routers]
        self._done = [False] * layers

    def disarm(self) -> None:
        self._routes = None

    def own_routes(self) -> torch.Tensor | None:
        """(B, S, L, k) the training forward's own routes since :meth:`arm` (first pass), or None if incomplete."""
        if not all(self._done):
            return None
        b, s = self._shape
        per_layer = [torch.cat(chunks).reshape(b, s, -1) for chunks in self._own]
        return torch.stack(per_layer, dim=2)

    def _hook(self, module, _inputs, out):
        if self._routes is None:
            return None
        layer = self.layer[id(module)]
        logits, scores, indices = out
        n, total = indices.size(0), self._routes.size(1)
        start = self._offset[layer]
        if start + n > total:  # the backward's recomputation (gradient checkpointing) of a one-chunk forward
            start = 0
        if start + n > total:
            raise ValueError(f"a router call over {n} tokens does not fit the {total} armed positions")
        self._offset[layer] = start + n
        if not self._done[layer]:
            self._own[layer].append(indices.detach().to(torch.int16))
            self._done[layer] = start + n == total
        if not self.replay:
            return None
        armed = self._routes[layer, start : start + n].to(device=indices.device, dtype=indices.dtype)  # (N, k)
        forced = torch.where(armed >= 0, armed, indices)
        return logits, replay_scores(module, logits, forced), forced

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class TrainerRouting:
    """The trainer's side of routing: records the rollout's routes on the transformers path, lays them out for the
    batch (``trm_routes``), arms the :class:`RouteForcer` for the training forwards, counts the disagreement."""

    def __init__(self, model: torch.nn.Module, replay: bool):
        self.forcer = RouteForcer(model, replay)
        self.layers = len(self.forcer.routers)
        self.pending: tuple[list[torch.Tensor], list[int]] | None = None  # per-row routes, prompt lengths

    def recording(self, model: torch.nn.Module) -> RouteRecorder:
        """The recorder for one `generate` of ``model`` (generation routes itself: the forcer is disarmed)."""
        self.forcer.disarm()
        self.pending = None
        return RouteRecorder(model)

    def generated(self, recorder: RouteRecorder, prompt_ids: list, completion_ids: list) -> None:
        """Keeps the recorded routes per row, until :meth:`take` puts them into the batch."""
        recorded = recorder.routes(len(prompt_ids))
        if recorded is None:
            if self.forcer.replay and recorder.problem is not None:
                raise ValueError(
                    f"`trm_routing_replay=True` cannot take effect: {recorder.problem}. Generate with the KV cache "
                    "(drop `use_cache=False`), or set `trm_routing_replay=False`."
                )
            return
        routes, width = recorded
        prompt_lengths = [len(p) for p in prompt_ids]
        completion_lengths = [len(c) for c in completion_ids]
        self.pending = (per_sample_routes(routes, width, prompt_lengths, completion_lengths), prompt_lengths)

    def arm(self, routes: torch.Tensor | None) -> None:
        """Arms the forcer with the (B, S, L, k) routes of the next forward's rows, or disarms it (None). It stays
        armed after the forward, for the backward's recomputation under gradient checkpointing."""
        if routes is None:
            self.forcer.disarm()
        else:
            self.forcer.arm(routes)

    def arm_forward(self, inputs: dict[str, Any] | None, input_ids: torch.Tensor, logits_to_keep: int) -> None:
        """Arms the forcer for one training forward: the loss batch's ``trm_routes`` (``inputs``), or, for TRL's
        forwards inside generation (``inputs`` None), the routes of the batch being scored."""
        if inputs is not None:
            self.arm(inputs.get(ROUTES_KEY))
        else:
            self.arm(self.pending_layout(input_ids, logits_to_keep))

    def pending_layout(self, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor | None:
        """(B, P + C, L, k) routes of the batch being scored (TRL's forwards inside generation), or None."""
        if self.pending is None or len(self.pending[0]) != input_ids.size(0):
            return None
        rows, prompt_lengths = self.pending
        width = input_ids.size(1)
        return pad_routes(rows, prompt_lengths, width - logits_to_keep, width)

    def take(self, output: dict[str, Any]) -> None:
        """Puts the pending routes into the generated batch as ``trm_routes`` (B, P + C, L, k). With replay, a batch
        without them is an error: replay would silently not take effect."""
        pending, self.pending = self.pending, None
        if pending is None or len(pending[0]) != output["prompt_ids"].size(0):
            if self.forcer.replay:
                raise ValueError(
                    "`trm_routing_replay=True`, but this batch's generation recorded no routes for its rows (was "
                    "`generate` replaced, or did it not run the model's routers?). Generate with the model's own "
                    "`generate`, or set `trm_routing_replay=False`."
                )
            return
        rows, prompt_lengths = pending
        prompt_width = output["prompt_ids"].size(1)
        width = prompt_width + output["completion_ids"].size(1)
        routes = pad_routes(rows, prompt_lengths, prompt_width, width)
        output[ROUTES_KEY] = routes.to(output["prompt_ids"].device)

    def log_counts(self, inputs: dict[str, Any], gather: Any, window: Any, training: bool) -> None:
        """:meth:`counts` of the forward just run, summed over every process (``gather``: e.g. `Accelerator.gather`),
        into the trainer's metrics ``window`` (`trm/routing_disagree_frac` and per layer); nothing without routes."""
        counts = self.counts(inputs)
        if counts is not None:
            window.add_routing("train" if training else "eval", gather(counts.unsqueeze(0)).sum(dim=0))  # (2 + L,)

    def counts(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """(2 + L,) float: [counted tokens, tokens whose routing disagrees, per-layer disagreeing tokens] of the
        forward just run against the rollout's routes, or None without both."""
        rollout = inputs.get(ROUTES_KEY)
        own = self.forcer.own_routes()
        if rollout is None or own is None or own.shape != rollout.shape:
            return None
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        counted = counted_tokens(rollout, mask)  # (B, C)
        any_layer, per_layer = disagreement(rollout, own.to(rollout.device), counted)
        totals = [counted.sum(), any_layer.sum()]
        return torch.stack([*totals, *per_layer.sum(dim=(0, 1))]).float()


def check_routing_setup(trainer: Any) -> TrainerRouting | None:
    """The routing collaborator of a built ``trainer`` (duck-typed), or None when there is nothing to record; refuses
    `trm_routing_replay` by name where it cannot take effect."""
    replay = trainer.args.trm_routing_replay
    model = trainer.accelerator.unwrap_model(trainer.model)
    routers = router_modules(model)
    multi_turn = bool(trainer.tools) or getattr(trainer, "environment_factories", None) is not None
    reason = None
    if trainer.use_vllm:
        reason = (
            "TRL's vLLM generation does not return the experts vLLM routed each token to (vLLM reports them with "
            "`enable_return_routed_experts`, but TRL 1.16 neither asks for them nor passes them on)"
        )
    elif trainer.rollout_func is not None:
        reason = "a `rollout_func` returns no routed experts"
    elif trainer.use_transformers_continuous_batching:
        reason = "transformers continuous batching is not recorded (no router hooks in its batched generation)"
    elif multi_turn:
        reason = "tool / environment turns re-feed earlier completions as prompts; their routes are not recorded"
    elif routers:
        reason = replay_problem(model)
    else:
        reason = "the model has no `*TopKRouter` module (not a transformers 5 MoE model)"
    if replay and reason is not None:
        raise ValueError(f"`trm_routing_replay=True` cannot take effect: {reason}. Set `trm_routing_replay=False`.")
    if not routers or trainer.use_vllm or trainer.rollout_func is not None or multi_turn:
        return None
    if trainer.use_transformers_continuous_batching:
        return None
    from .callbacks import RouteDisarmCallback

    routing = TrainerRouting(model, replay)
    trainer.add_callback(RouteDisarmCallback(routing.forcer))  # no stale routes forced outside a training step
    return routing
