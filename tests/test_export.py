"""`lgemma export <run> --to transformers DIR`: a trained mlp2x_gelu variant (full LM, or LoRA
adapters merged into it) becomes a transformers `LlavaForConditionalGeneration` folder that gives
the same logits as lgemma's model; other connectors are refused with the reason and the way out.
The variants train for a few steps in fast mode (seconds)."""
import pytest
import torch

from lgemma import cli
from lgemma.pack import PackError, export_transformers

# Fast mode cut further: only a trained run folder is needed, not a good model.
TOY = [f"train.{k}=2" for k in ("stage0.clip_steps", "stage0.lm_steps", "align.steps", "instruct.steps")] + \
      [f"train.{k}=8" for k in ("stage0.clip_batch_size", "stage0.lm_batch_size", "align.batch_size",
                                "instruct.batch_size")] + \
      ["data.n_train=64", "data.n_heldout=8", "data.n_compositional=8", "connector.kind=mlp2x_gelu"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LGEMMA_FAST", "1")
        mp.setenv("LGEMMA_HOME", str(tmp_path_factory.mktemp("export-home")))
        yield mp


def trained(name: str, *overrides: str):
    from lgemma.pipeline import get_config, train_variant
    cfg = get_config("tiny", [*TOY, f"name={name}", *overrides])
    train_variant(cfg, progress=False, evaluate=False)
    return cfg.run_dir


@pytest.mark.parametrize("lm_train", ["full", "lora"])
def test_export_matches_lgemma(home, tmp_path, lm_train):
    from transformers import LlavaForConditionalGeneration

    from lgemma.data.collate import build_prompt
    from lgemma.data.shapes import sample
    from lgemma.pipeline import load_variant
    run = trained(f"tiny-mlp-{lm_train}", f"train.instruct.lm_train={lm_train}", "train.instruct.lora_rank=4")
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--to", "transformers", str(out)]) == 0
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))

    ours, tok, _ = load_variant(run)
    if lm_train == "lora":  # the adapters trained: the export must carry them, merged
        assert any(p.abs().sum() > 0 for n, p in ours.lm.named_parameters() if "lora_B" in n)
    theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([build_prompt(tok, "<image>\nWhat color is the circle?", ours.num_image_tokens)])
    pixels = ours.vision.preprocess(sample(1)[0])[None]
    with torch.no_grad():
        a = ours(ids, torch.ones_like(ids), images=pixels)
        b = theirs(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    assert (a - b).abs().max() < 1e-4


def test_export_refuses_other_connectors_and_says_what_to_do(home, tmp_path, capsys):
    run = trained("tiny-conv", "connector.kind=conv_mlp")
    out = tmp_path / "export"
    with pytest.raises(PackError, match=r"'conv_mlp' connector.*mlp2x_gelu.*lgemma train \S*tiny-conv/config.yaml "
                                        r"--set connector.kind=mlp2x_gelu --set name=tiny-conv-mlp.*lgemma pack"):
        export_transformers(run, out)
    assert not out.exists()
    assert cli.main(["export", str(run), "--to", "transformers", str(out)]) == 2
    assert "lgemma export: error:" in capsys.readouterr().err and not out.exists()


def test_export_needs_a_trained_run_and_an_empty_folder(home, tmp_path):
    with pytest.raises(PackError, match="not a trained run"):
        export_transformers(tmp_path / "nothing", tmp_path / "out")
    run = trained("tiny-mlp-full", "train.instruct.lm_train=full", "train.instruct.lora_rank=4")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PackError, match="not an empty folder"):
        export_transformers(run, tmp_path / "busy")
