"""The MoE router auxiliary (load-balancing) loss, restricted to the tokens TRM keeps.

TRL adds the architecture's aux loss as one scalar over every attended token of the micro-batch, so a rejected
sequence would still move the router. Here the router logits of the same forward are recorded with forward hooks on
transformers 5's ``*TopKRouter`` modules (output 0 is the router logits), and the architecture's own
``load_balancing_loss_func`` is called with an attention mask that keeps:

* completion tokens whose TRM weight is non-zero;
* the prompt tokens of a row with at least one such token (the architecture's own loss counts every attended token,
  prompt included); a row whose every completion token is rejected contributes nothing, prompt included.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``*TopKRouter`` modules of ``model``, in forward order."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


class RouterLogitsCapture:
    """Context manager recording every router call's logits (a list of (N, E) tensors, in call order)."""

    def __init__(self, model: torch.nn.Module):
        self.routers = router_modules(model)
        self.logits: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> RouterLogitsCapture:
        hook = lambda _m, _i, out: self.logits.append(out[0])  # noqa: E731
        self._handles = [r.register_forward_hook(hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def kept_attention_mask(attention_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, P+C) mask of the tokens the aux loss counts, from the (B, P+C) attention mask and (B, C) TRM weights."""
    kept = attention_mask.clone()
    completion = weights.shape[1]
    accepted = (weights != 0).to(kept.dtype)  # (B, C)
    kept[:, -completion:] = kept[:, -completion:] * accepted
    row_kept = accepted.any(dim=1, keepdim=True).to(kept.dtype)  # (B, 1)
    return kept * row_kept


def masked_aux_loss(capture: RouterLogitsCapture, config: Any, attention_mask, weights, batch_size) -> torch.Tensor:
    """The mean over forward chunks (as TRL averages them) of the architecture's load-balancing loss over kept
    tokens."""
    func = sys.modules[type(capture.routers[0]).__module__].load_balancing_loss_func
    n_layers = len(capture.routers)
    kept = kept_attention_mask(attention_mask, weights)  # (B, P+C)
    chunk = batch_size or kept.shape[0]
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    top_k = config.num_experts_per_tok
    losses = []
    for i, start in enumerate(range(0, kept.shape[0], chunk)):
        gate_logits = tuple(capture.logits[i * n_layers : (i + 1) * n_layers])
        losses.append(func(gate_logits, num_experts, top_k, kept[start : start + chunk]))
    return torch.stack(losses).mean()


def masked_aux_loss_of(model: torch.nn.Module, capture: RouterLogitsCapture, attention_mask, weights, batch_size):
    """:func:`masked_aux_loss` with the (unwrapped) ``model``'s text config."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return masked_aux_loss(capture, text_config, attention_mask, weights, batch_size)
