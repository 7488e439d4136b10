import pytest

from lgemma.config import Config, get_preset, PRESETS
from lgemma.pipeline import get_config


def test_yaml_round_trip(tmp_path):
    cfg = get_preset("tiny-noalign")
    cfg.train.instruct.steps = 123
    cfg.to_yaml(tmp_path / "c.yaml")
    back = Config.from_yaml(tmp_path / "c.yaml")
    assert back == cfg and back.train.skip_align and back.train.instruct.steps == 123


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError) as e:
        get_preset("tinyy")
    for name in PRESETS:
        assert name in str(e.value)


def test_unknown_yaml_key_raises(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  instruct:\n    stepz: 10\n")
    with pytest.raises(ValueError, match="stepz"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_overrides(monkeypatch):
    monkeypatch.delenv("LGEMMA_FAST", raising=False)
    cfg = get_config("tiny", ["train.instruct.lr=0.0005", "connector.kind=linear"])
    assert cfg.train.instruct.lr == 0.0005 and cfg.connector.kind == "linear"
    with pytest.raises(ValueError, match="no field"):
        get_config("tiny", ["train.nope=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        get_config("tiny", ["train.instruct.lr"])


def test_overrides_take_the_field_type(monkeypatch):
    """YAML reads 1e-3 as a string; a learning rate must still come out a float."""
    monkeypatch.delenv("LGEMMA_FAST", raising=False)
    cfg = get_config("tiny", ["train.instruct.lm_lr=1e-3", "train.instruct.steps=4e2", "train.devices=auto"])
    assert cfg.train.instruct.lm_lr == 0.001 and isinstance(cfg.train.instruct.lm_lr, float)
    assert cfg.train.instruct.steps == 400 and isinstance(cfg.train.instruct.steps, int)
    assert cfg.train.devices == "auto"
    for bad, message in [("train.instruct.steps=abc", "steps must be an int"), ("train.instruct.steps=2.5", "an int"),
                         ("train.instruct.lr=fast", "lr must be a float"), ("train.skip_align=3", "must be a bool")]:
        with pytest.raises(ValueError, match=message):
            get_config("tiny", [bad])


def test_override_beats_fast_mode_and_bad_sections_are_clear(monkeypatch):
    monkeypatch.setenv("LGEMMA_FAST", "1")
    assert get_config("tiny", ["train.instruct.steps=7"]).train.instruct.steps == 7
    with pytest.raises(ValueError, match="no field 'trian'"):
        get_config("tiny", ["trian.steps=1"])
