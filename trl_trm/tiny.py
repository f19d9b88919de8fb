"""Build a tiny causal LM and tokenizer locally (no download): used by the tests and the offline demo.

The tokenizer is a byte-level BPE trained on a few hundred strings, wrapped in `PreTrainedTokenizerFast` with pad
and eos tokens and a ChatML-style chat template. The model is a 2-layer Qwen2 (~100k parameters, head_dim 32 so
that vLLM's CPU attention accepts it).
"""

from __future__ import annotations

import os
import random

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_end|>", "<|im_start|>"]


def _corpus(seed: int = 0, size: int = 400) -> list[str]:
    rng = random.Random(seed)
    words = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()
    lines = []
    for _ in range(size):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))))
        lines.append("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))))
    return lines


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer (vocab ~``vocab_size``) and wrap it in `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A randomly initialised tiny Qwen2 causal LM matching ``tokenizer``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_moe_model(tokenizer, seed: int = 0, router_std: float | None = 0.5, **config_kwargs):
    """A randomly initialised tiny Qwen3-MoE causal LM matching ``tokenizer`` (2 layers, hidden 32, 4 experts, top-2,
    head_dim 16; ``config_kwargs`` override any `Qwen3MoeConfig` field). ``router_std``: the routers' weights are
    re-drawn from N(0, std²) so that routing is decisive (the default init gives near-uniform router logits); None
    keeps the default init."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .moe import router_modules

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**fields, **config_kwargs}))
    if router_std is not None:
        for router in router_modules(model):
            torch.nn.init.normal_(router.weight, std=router_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_moe_model(path: str | os.PathLike, seed: int = 0, **model_kwargs) -> str:
    """Build the tiny tokenizer and a tiny Qwen3-MoE (:func:`build_tiny_moe_model`) and save both to ``path``."""
    tokenizer = build_tiny_tokenizer(seed=seed)
    build_tiny_moe_model(tokenizer, seed=seed, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_model(path: str | os.PathLike, seed: int = 0, **model_kwargs) -> str:
    """Build the tiny tokenizer and model and save both to ``path`` (returned as str)."""
    tokenizer = build_tiny_tokenizer(seed=seed)
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
