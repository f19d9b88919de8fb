"""Hub publishing: the TRM section of the model card, and clear errors when the Hub cannot be reached.

`TRMTrainer.create_model_card` calls TRL's (tags `trl`, `grpo`, `trm`, base model, GRPO citation) and appends
:func:`trm_card_section`: the TRM settings, the final accept-rate figures and the TRM citation. Network failures
while creating the repository or pushing become a :class:`HubPublishError` that names the cause and the fix,
instead of a traceback from inside `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

TRM_CITATION = """\
@misc{li2025trm,
    title        = {{Trust Region Masking for Long-Horizon LLM Reinforcement Learning}},
    author       = {Yingru Li},
    year         = 2025,
    month        = dec,
    note         = {Talk, December 20, 2025},
}"""

CARD_MARKER = "## Trust Region Masking"


class HubPublishError(RuntimeError):
    """The Hub could not be reached (offline, not logged in, no permission) while creating the repo or pushing."""


# The way out every Hub error offers.
PUBLISH_LATER = (
    "or set `push_to_hub: false`: the model and its card are saved in output_dir and can be uploaded later with "
    "`hf upload <repo_id> <output_dir>`."
)


def offline_push_error(repo_id: str | None) -> HubPublishError:
    """The error for `push_to_hub` under HF_HUB_OFFLINE=1, raised before the model loads (on every rank)."""
    return HubPublishError(
        f"`push_to_hub` is set but HF_HUB_OFFLINE=1: {repo_id or '(hub_model_id)'} cannot be created or pushed. "
        f"Unset HF_HUB_OFFLINE to publish, {PUBLISH_LATER}"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "None" if value is None else f"{value}"


def final_accept_figures(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Accept-rate figures from `trainer.state.log_history`: last logged value, mean over logs, and the last logged
    rejection rate of every criterion. Empty when no `trm/` metric was logged."""
    logs = [h for h in log_history if "trm/accept_rate" in h and h["trm/accept_rate"] is not None]
    if not logs:
        return {}
    figures = {
        "trm/accept_rate (last log)": float(logs[-1]["trm/accept_rate"]),
        "trm/accept_rate (mean over logs)": sum(float(h["trm/accept_rate"]) for h in logs) / len(logs),
        "logs": float(len(logs)),
    }
    for key, value in logs[-1].items():
        if key.startswith("trm/reject_rate/") and value is not None:
            figures[f"{key} (last log)"] = float(value)
    # TRL logs `reward=None` for a step where every reward function returned None: shown as "n/a", not a crash.
    if "reward" in logs[-1]:
        reward = logs[-1]["reward"]
        figures["reward (last log)"] = float("nan") if reward is None else float(reward)
    return figures


def trm_card_section(config, log_history: list[dict[str, Any]], calibration: dict[str, Any] | None = None) -> str:
    """Markdown appended to the model card: settings (and the thresholds `trm_calibrate_accept` chose), final
    accept-rate figures, citation."""
    settings = {name: getattr(config, name) for name in sorted(vars(config)) if name.startswith("trm_")}
    settings["loss_type"] = config.loss_type
    settings["vllm_importance_sampling_correction"] = config.vllm_importance_sampling_correction
    lines = [
        CARD_MARKER,
        "",
        "This model was trained with `trl_trm.TRMTrainer`: TRL's GRPO with Trust Region Masking,",
        "which rejects whole sequences whose worst token leaves the trust region between the rollout engine and the",
        "trained policy.",
        "",
        "### TRM settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{k}` | {_fmt(v)} |" for k, v in settings.items()],
        "",
    ]
    lines += _calibration_lines(calibration)
    lines += _segments_lines(getattr(config, "output_dir", None))
    figures = final_accept_figures(log_history)
    lines += ["### Final masking statistics", ""]
    if figures:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in figures.items() if k != "logs"]
        lines += ["", f"Over {int(figures['logs'])} logged steps.", ""]
    else:
        lines += [
            "No `trm/` metrics were logged (no training step, or `trm_mode='none'` without rollout log-probs).",
            "",
        ]
    lines += ["### Cite Trust Region Masking", "", "```bibtex", TRM_CITATION, "```", ""]
    return "\n".join(lines)


def _calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    """The thresholds `trm_calibrate_accept` set before the first step (they replace the configured ones above)."""
    if not calibration or calibration.get("thresholds") is None:
        return []
    lines = [
        "### Calibrated thresholds",
        "",
        f"Set before the first optimiser step from {calibration['batches']} sampled batch(es), for a target accept "
        f"rate of {_fmt(calibration['target'])} (`trm_mode={calibration['mode']!r}`; accepted on those batches: "
        f"{_fmt(calibration.get('accept'))}). They replace the configured values above for the whole run.",
        "",
        "| threshold | value |",
        "|---|---|",
    ]
    lines += [f"| `trm_{k}` | {v!r} |" for k, v in calibration["thresholds"].items()]
    return [*lines, ""]


def _segments_lines(output_dir: str | None) -> list[str]:
    """The card's table of TRM settings per segment, for a run resumed with other settings (`--allow_trm_change`,
    recorded in `trm_segments.json` by `trl_trm.checkpoints.record_segments`); empty otherwise."""
    from .checkpoints import read_segments

    segments = read_segments(output_dir) if output_dir else []
    if len(segments) < 2:
        return []
    names = sorted({k for s in segments for k in s.get("settings", {})})
    lines = [
        "### TRM settings changed during training",
        "",
        "This run was resumed with other TRM settings (`--allow_trm_change`); the table above shows the last segment.",
        "",
        "| from step | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for segment in segments:
        values = [_fmt(segment["settings"].get(n)) for n in names]
        lines.append(f"| {segment['from_step']} | " + " | ".join(values) + " |")
    return [*lines, ""]


def append_trm_section(
    readme_path: str, config, log_history: list[dict[str, Any]], calibration: dict[str, Any] | None = None
) -> None:
    """Append (or replace) the TRM section of a model card written by TRL."""
    text = ""
    if os.path.exists(readme_path):
        with open(readme_path, encoding="utf-8") as f:
            text = f.read()
    if CARD_MARKER in text:
        text = text[: text.index(CARD_MARKER)].rstrip() + "\n"
    text = text.rstrip() + "\n\n" + trm_card_section(config, log_history, calibration)
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str | None) -> Iterator[None]:
    """Turn a network/auth failure of `action` into a HubPublishError naming the repo, the cause and the fix."""
    try:
        yield
    except HubPublishError:
        raise
    except Exception as err:
        if not _is_hub_failure(err):
            raise
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        fix = (
            "HF_HUB_OFFLINE=1 is set: unset it to publish"
            if offline
            else "check the network and log in (`hf auth login`, or set HF_TOKEN)"
        )
        raise HubPublishError(
            f"Could not {action} {repo_id or '(hub_model_id)'} on the Hugging Face Hub ({cause}). To publish, {fix}; "
            f"{PUBLISH_LATER}"
        ) from err


def _is_hub_failure(err: Exception) -> bool:
    """Errors raised by huggingface_hub/requests/httpx for network, offline mode, auth or permission."""
    names = {cls.__name__ for cls in type(err).__mro__}
    modules = {cls.__module__.split(".")[0] for cls in type(err).__mro__}
    return bool(
        names
        & {
            "OfflineModeIsEnabled",
            "HfHubHTTPError",
            "LocalTokenNotFoundError",
            "ConnectionError",
            "ConnectError",
            "Timeout",
            "TimeoutException",
            "NetworkError",
        }
        or modules & {"huggingface_hub", "requests", "httpx", "urllib3"}
    )
