"""Tiny-trainer settings shared by the test suites (tests/conftest.py and tests/vllm_cpu/, which runs in its own
venv): a reward that varies between completions, TRMConfig kwargs for fast CPU runs, the loss batch of 4 sequences, a
`trl-trm train` recipe, and the check that two runs logged the same step. A plain module, so any test
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


def loss_batch(prompt_ids, completion_ids, completion_mask, sampling_logps, **extra):
    """The batch `GRPOTrainer._compute_loss` reads (keys of `_generate_and_score_completions`) for 4 sequences with
    fixed advantages; ``extra`` adds keys (``old_per_token_logps``, the ``trm_topk_*`` tensors)."""
    import torch

    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2]),
        "num_items_in_batch": completion_mask.sum(),
        "sampling_per_token_logps": sampling_logps,
        **extra,
    }


MISSING_MODEL = "/nonexistent/model-dir"  # loading it would fail: an error about anything else came first


def write_recipe(path, text=None, **overrides):
    """A one-step `trl-trm train` recipe on the built-in reversal task, written to ``path`` (YAML; ``text`` writes
    that text instead). Its model is :data:`MISSING_MODEL` unless overridden."""
    import yaml

    recipe = {
        "model_name_or_path": MISSING_MODEL,
        "dataset_name": "builtin:reversal",
        "reward_funcs": ["reversal"],
        "output_dir": str(path.parent / "out"),
        "use_cpu": True,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "report_to": [],
        "save_strategy": "no",
    }
    recipe.update(overrides)
    path.write_text(text if text is not None else yaml.safe_dump(recipe))
    return path


def assert_same_step(one_log, two_log):
    """Two runs of the same step (1 and 2 processes) logged the same `trm/` metrics, grad norm and loss; returns the
    compared `trm/` keys."""
    import math

    keys = sorted(k for k in one_log if k.startswith("trm/") and one_log[k] is not None)
    for k in keys:
        assert math.isclose(one_log[k], two_log[k], rel_tol=1e-5, abs_tol=1e-7), (k, one_log[k], two_log[k])
    assert math.isclose(one_log["grad_norm"], two_log["grad_norm"], rel_tol=1e-4)
    assert math.isclose(one_log["loss"], two_log["loss"], rel_tol=1e-4, abs_tol=1e-7)
    return keys


def one_error_line(capsys) -> str:
    """The one `error:` line a failed `trl-trm` command printed on stderr (no traceback, exactly one such line)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def torchrun(nproc: int = 2) -> list[str]:
    """The start of a `torchrun --nproc_per_node N` command on a free local port (torchrun's `--master_port 0` hangs
    with a single node here)."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]


def trl_policy_loss(trainer, batch, logps, old_logps, advantages):
    """TRL 1.16's policy loss written out by hand (no KL term): per-token losses of ``trainer.args.loss_type`` with
    the ratio ``exp(logps - old_logps)`` and the (B, T) ``advantages``, reduced as that loss type reduces them."""
    import torch

    args, adv = trainer.args, advantages
    mask = batch["completion_mask"].float()
    coef_1 = torch.exp(logps - old_logps)
    if args.loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=trainer.epsilon_high).detach() * adv * logps
    elif args.loss_type == "sapo":
        tau = torch.where(adv > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if args.loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    if args.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum()
    if args.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.size(0) * args.max_completion_length)
    if args.loss_type in ("dapo", "cispo"):
        return (per_token * mask).sum() / batch["num_items_in_batch"]
    if args.loss_type == "luspo":
        return (per_token * mask).sum(-1).mean()
    raise AssertionError(args.loss_type)
