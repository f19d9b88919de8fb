"""Hub publishing: the TRM card section, and a clear one-line error when the Hub cannot be reached."""

from __future__ import annotations

import math

import pytest

from trl_trm import TRMConfig
from trl_trm.cli import main
from trl_trm.demo import demo_recipe_path
from trl_trm.hub import HubPublishError, append_trm_section, final_accept_figures, hub_errors


def test_final_accept_figures_from_log_history():
    history = [
        {"step": 1, "reward": 0.1, "trm/accept_rate": 0.5, "trm/reject_rate/delta_max": 0.5},
        {"step": 2, "loss": 0.3},
        {"step": 3, "reward": 0.3, "trm/accept_rate": 0.9, "trm/reject_rate/delta_max": 0.1},
    ]
    figures = final_accept_figures(history)
    assert figures["trm/accept_rate (last log)"] == 0.9
    assert figures["trm/accept_rate (mean over logs)"] == pytest.approx(0.7)
    assert figures["trm/reject_rate/delta_max (last log)"] == 0.1 and figures["reward (last log)"] == 0.3
    assert final_accept_figures([{"step": 1, "loss": 1.0}]) == {}


def test_card_section_with_a_none_reward(tmp_path):
    """TRL logs `reward=None` for a step where every reward function returned None: the card shows n/a."""
    history = [{"step": 1, "reward": None, "trm/accept_rate": 1.0}]
    assert math.isnan(final_accept_figures(history)["reward (last log)"])
    readme = tmp_path / "README.md"
    append_trm_section(str(readme), TRMConfig(output_dir=str(tmp_path), use_cpu=True), history)
    assert "| `reward (last log)` | n/a |" in readme.read_text()


def test_card_section_is_appended_once(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\ntags:\n- trl\n---\n# Model\n")
    config = TRMConfig(output_dir=str(tmp_path), use_cpu=True, trm_delta_max=0.5, trm_delta_avg=None)
    history = [{"step": 1, "trm/accept_rate": 0.75}]
    append_trm_section(str(readme), config, history)
    append_trm_section(str(readme), config, history)  # re-created cards are not duplicated
    text = readme.read_text()
    assert text.startswith("---\ntags:\n- trl\n---\n# Model\n")
    assert text.count("## Trust Region Masking") == 1
    assert (
        "| `trm_mode` | trm |" in text and "| `trm_delta_max` | 0.5 |" in text and "| `trm_delta_avg` | None |" in text
    )
    assert "| `trm/accept_rate (last log)` | 0.75 |" in text and "@misc{li2025trm" in text


def test_hub_errors_wraps_network_failures_only():
    class HfHubHTTPError(Exception):  # same name as huggingface_hub's: recognised by name
        pass

    with pytest.raises(HubPublishError, match="Could not push to me/x .*HfHubHTTPError: 401"):
        with hub_errors("push to", "me/x"):
            raise HfHubHTTPError("401 unauthorized")
    with pytest.raises(KeyError):  # a bug is not disguised as a network problem
        with hub_errors("push to", "me/x"):
            raise KeyError("x")


def test_push_without_network_fails_with_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", "--config", demo_recipe_path(), "--model_name_or_path", "builtin:tiny"]
    argv += ["--output_dir", str(tmp_path), "--max_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "`push_to_hub` is set but HF_HUB_OFFLINE=1: me/x cannot be created" in err and "Traceback" not in err
    assert not (tmp_path / "trm_stats.jsonl").exists() and not (tmp_path / "_init-model").exists()  # before the model


def test_unreachable_hub_at_repo_creation_is_one_clear_line(make_trainer, monkeypatch):
    """Not offline mode but no network: `init_hf_repo` (called by Trainer.__init__) raises a HubPublishError."""
    import huggingface_hub

    class ConnectError(Exception):  # httpx's connection error, by name
        pass

    def create_repo(*args, **kwargs):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(HubPublishError, match=r"Could not create the repository me/x .*ConnectError: \[Errno -3\]"):
        make_trainer(push_to_hub=True, hub_model_id="me/x")
