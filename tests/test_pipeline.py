"""End to end in fast mode: `lgemma train` really runs data, stage 0, stage 1, stage 2 and eval."""
import json
import subprocess
import sys

import pytest
import torch

from lgemma import cli


@pytest.fixture
def fast_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LGEMMA_FAST", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_train_end_to_end_fast(fast_env, capsys):
    from lgemma.pipeline import get_config, load_variant
    assert cli.main(["train", "tiny", "tiny-noalign"]) == 0
    out = capsys.readouterr().out
    assert "tiny-noalign" in out and "blind" in out
    for name in ("tiny", "tiny-noalign"):
        m = json.loads((fast_env / "runs-fast" / name / "metrics.json").read_text())
        for key in ("overall_accuracy", "blind_accuracy", "per_type", "train_seconds", "compositional_accuracy", "pope"):
            assert key in m, key
        assert {"color", "shape", "size", "count", "exist", "spatial"} <= set(m["per_type"])
    assert (fast_env / "runs-fast/tiny/align/trained.safetensors").exists()
    assert not (fast_env / "runs-fast/tiny-noalign/align").exists()      # skip_align really skips
    # the saved variant reloads and answers the same as in training's evaluation
    cfg = get_config("tiny")
    model, tok, saved = load_variant(cfg.run_dir)
    assert saved.name == "tiny" and model.num_image_tokens == 64
    # a second run is cached: nothing retrained
    assert cli.main(["train", "tiny"]) == 0
    # the same run name with another config is refused, not silently reused
    assert cli.main(["train", "tiny", "--set", "train.instruct.steps=7"]) == 2
    assert "different config" in capsys.readouterr().err


def test_cli_unknown_preset_is_a_clear_error(fast_env, capsys):
    assert cli.main(["train", "tinyy"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'tinyy'" in err and "tiny-noalign" in err


@pytest.mark.parametrize("command", ["data", "pretrain-unimodal", "train", "eval"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "lgemma.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--set" in out.stdout


def test_budget_curve_seconds_survive_a_resume():
    """The curve's training seconds are saved in each checkpoint and count on after a resume."""
    import time
    from lgemma.pipeline import BudgetCurve
    before = BudgetCurve.__new__(BudgetCurve)          # the callback's clock only, no eval data needed
    before.seconds, before.t0 = 12.0, time.perf_counter() - 3.0
    state = before.state_dict()
    assert 15.0 <= state["seconds"] < 16.0
    after = BudgetCurve.__new__(BudgetCurve)
    after.seconds = 0.0                               # what a fresh callback reads from curve.json's last row
    after.load_state_dict(state)
    assert after.seconds == state["seconds"]
