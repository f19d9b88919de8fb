"""The mismatch study's task (`experiments/mismatch_study.py`): prompts, exact graded rewards and the supervised warm
start that every method of a seed starts from. See docs/mismatch-study.md."""

from __future__ import annotations

from typing import Any

TASK = "class"  # "class", "copy" or "reverse" (see task_rows)


def task_rows(n: int, seed: int, task: str | None = None, min_len: int = 2, max_len: int = 12) -> list[dict[str, Any]]:
    """String tasks on words of ``min_len``-``max_len`` letters from a-j: "reverse: <word>" -> the reversed word (the
    demo's task, `trl_trm.demo`) or "copy: <word>" -> the word (easier: the tiny model learns it by RL in the
    study's budget, reversal it does not). Words are longer than the demo's 2-4 letters, so completion lengths spread."""
    import random

    task = TASK if task is None else task
    if task not in ("copy", "reverse", "class"):
        raise ValueError(f"Unknown task {task!r}: 'class', 'copy' or 'reverse'.")
    rng = random.Random(seed)
    rows = []
    if task == "class":  # "letters 5" -> 5 letters from a-j; "digits 3" -> 3 digits (graded by class_reward)
        for _ in range(n):
            kind, count = rng.choice(("letters", "digits")), rng.randint(min_len, max_len)
            target = ("a" if kind == "letters" else "0") * count  # a representative answer; any of the class scores
            rows.append({"prompt": [{"role": "user", "content": f"{kind} {count}"}], "target": target})
        return rows
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(min_len, max_len)))
        target = word[::-1] if task == "reverse" else word
        rows.append({"prompt": [{"role": "user", "content": f"{task}: {word}"}], "target": target})
    return rows


def positional_reward(completions, target, **kwargs) -> list[float]:
    """Exact, graded reward in [0, 1]: the fraction of positions where the answer matches the target, over the longer
    of the two (1.0 = exactly the target). The positional half of `trl_trm.rewards.reversal`; its other half (fraction
    of the word's letters, at any length) let RL drift to long answers here, so it is left out."""
    rewards = []
    for completion, want in zip(completions, target, strict=True):
        got = (completion[-1]["content"] if isinstance(completion, list) else completion).strip()
        hits = sum(a == b for a, b in zip(got, want, strict=False))
        rewards.append(hits / max(len(want), len(got), 1))
    return rewards


def class_reward(completions, target, **kwargs) -> list[float]:
    """Exact, graded reward in [0, 1] of the "class" task: (fraction of the answer's characters in the requested class,
    a-j or 0-9) x (1 - |answer length - requested length| / requested length, floored at 0). 1.0 = exactly the
    requested number of characters, all of the class. Spaces count as characters (outside both classes)."""
    rewards = []
    for completion, want in zip(completions, target, strict=True):
        got = (completion[-1]["content"] if isinstance(completion, list) else completion).strip()
        if not got:
            rewards.append(0.0)
            continue
        allowed = "abcdefghij" if want[0] == "a" else "0123456789"
        in_class = sum(c in allowed for c in got) / len(got)
        length = max(0.0, 1.0 - abs(len(got) - len(want)) / len(want))
        rewards.append(in_class * length)
    return rewards


def task_reward(completions, target, **kwargs) -> list[float]:
    """The reward of :data:`TASK`."""
    fn = class_reward if TASK == "class" else positional_reward
    return fn(completions, target, **kwargs)


def _eval_rows(n: int, answer_len: tuple[int, int] = (2, 12)) -> list[dict[str, Any]]:
    return task_rows(n, seed=10_000, min_len=answer_len[0], max_len=answer_len[1])  # held out: training uses 0, 1, ...


def warm_start(
    tokenizer,
    seed: int,
    steps: int,
    lr: float = 3e-3,
    batch: int = 32,
    hidden_size: int = 64,
    answer_len: tuple[int, int] = (2, 12),
):
    """A short supervised warm start (teacher forcing on prompt + reversed word + EOS, loss on the answer only), so
    that RL starts from a weak but non-trivial policy that ends its answers (variable lengths), as RL after SFT does.
    Deliberately under-trained: RL has room to improve."""
    import random

    import torch

    from trl_trm.tiny import build_tiny_model

    model = build_tiny_model(tokenizer, seed=seed, hidden_size=hidden_size)
    if steps <= 0:
        return model
    rows = task_rows(steps * batch, seed=50_000 + seed, min_len=answer_len[0], max_len=answer_len[1])
    sft_rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        chunk = rows[step * batch : (step + 1) * batch]
        seqs, starts = [], []
        for row in chunk:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
            prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
            text = row["target"]
            if text[0] in "a0" and set(text) == {text[0]}:  # "class" task: a random answer of the class
                alphabet = "abcdefghij" if text[0] == "a" else "0123456789"
                text = "".join(sft_rng.choice(alphabet) for _ in text)
            answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(prompt + answer)
            starts.append(len(prompt))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (x, st) in enumerate(zip(seqs, starts, strict=True)):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
            labels[i, st : len(x)] = torch.tensor(x[st:])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


FATAL = "!"  # the "collapse" family's fatal character (token 3 of the tiny tokenizer): the engine collapses onto it


def class_fatal_reward(completions, target, **kwargs) -> list[float]:
    """:func:`class_reward`, and 0 for an answer that contains :data:`FATAL` (a failure state: the token the
    `collapse` engine puts its mass on in the contexts that decide the answer's length)."""
    rewards = class_reward(completions, target)
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [0.0 if FATAL in text else r for r, text in zip(rewards, texts, strict=True)]
