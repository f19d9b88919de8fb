"""Tiny-trainer settings shared by the test suites (tests/conftest.py and tests/vllm_cpu/, which runs in its own
venv): a reward that varies between completions and TRMConfig kwargs for fast CPU runs. A plain module, so any test
folder can import it without going through a conftest."""

from __future__ import annotations


def length_reward(completions, **kwargs):
    """Reward in [0, 1] that varies between completions, so advantages are non-zero."""
    return [min(len(c), 40) / 40 for c in completions]


def base_config_kwargs(output_dir, **overrides):
    """TRMConfig kwargs for fast CPU runs: bf16 autocast on CPU gives a real rollout/training mismatch."""
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=True,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        temperature=1.0,
    )
    kwargs.update(overrides)
    return kwargs
