"""Real training steps on tiny random models: loss goes down, freezing, checkpoints, resume."""
import copy
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lgemma.config import StageConfig
from lgemma.data.collate import LlavaDataset, collate
from lgemma.data.llava_json import load_records
from lgemma.training import train_stage

QUIET = dict(enable_progress_bar=False, logger=False)


def dataset(world, model, tok, name="instruct_train.json", n=64):
    recs = load_records(world / name)[:n]
    return LlavaDataset(recs, tok, model.num_image_tokens,
                        lambda r: torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(hash(r["id"]) % 2**31)))


def fixed_loss(model, ds):
    model.eval()
    b = collate([ds[i] for i in range(16)], ds.tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(b["input_ids"], b["attention_mask"], b["labels"], b["images"])[0])


def test_a_few_real_steps_reduce_the_loss(tiny_model, world, tmp_path):
    model, tok = tiny_model
    ds = dataset(world, model, tok)
    before = fixed_loss(model, ds)
    cfg = StageConfig(steps=30, batch_size=8, lr=3e-3, lm_lr=3e-3)
    train_stage(model, "instruct", cfg, ds, tmp_path, trainer_kwargs=QUIET)
    after = fixed_loss(model, ds)
    assert after < 0.8 * before, (before, after)


def test_align_trains_only_the_connector_and_checkpoint_round_trips(tiny_model, world, tmp_path):
    model, tok = tiny_model
    lm0, vis0 = copy.deepcopy(model.lm.state_dict()), copy.deepcopy(model.vision.state_dict())
    con0 = copy.deepcopy(model.connector.state_dict())
    ds = dataset(world, model, tok, "captions.json")
    train_stage(model, "align", StageConfig(steps=5, batch_size=8, lr=1e-2), ds, tmp_path, trainer_kwargs=QUIET)
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm0.items())
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vis0.items())
    assert not all(torch.equal(v, model.connector.state_dict()[k]) for k, v in con0.items())
    saved = load_file(str(tmp_path / "trained.safetensors"))
    assert saved and all(k.startswith("connector.") for k in saved)   # only what trained
    # round trip: a fresh model + the checkpoint gives identical logits
    fresh = copy.deepcopy(model)
    fresh.connector.load_state_dict(con0)
    fresh.load_state_dict(saved, strict=False)
    b = collate([ds[i] for i in range(4)], tok.pad_token_id)
    with torch.no_grad():
        a = model.eval()(b["input_ids"], b["attention_mask"], images=b["images"])
        c = fresh.eval()(b["input_ids"], b["attention_mask"], images=b["images"])
    assert torch.equal(a, c)


def test_instruct_checkpoint_holds_connector_and_lm_not_vision(tiny_model, world, tmp_path):
    model, tok = tiny_model
    train_stage(model, "instruct", StageConfig(steps=2, batch_size=4, lr=1e-3, lm_lr=1e-3),
                dataset(world, model, tok, n=8), tmp_path, trainer_kwargs=QUIET)
    keys = load_file(str(tmp_path / "trained.safetensors")).keys()
    assert any(k.startswith("lm.") for k in keys) and any(k.startswith("connector.") for k in keys)
    assert not any(k.startswith("vision.") for k in keys)


class Crash(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


class Slow(L.Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.2)


class StartStep(L.Callback):
    def on_train_start(self, trainer, *args):
        self.step = trainer.global_step


def test_resumed_run_continues_from_its_step(tiny_model, world, tmp_path):
    model, tok = tiny_model
    ds = dataset(world, model, tok, n=32)
    cfg = StageConfig(steps=8, batch_size=4, lr=1e-3, lm_lr=1e-3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_stage(model, "instruct", cfg, ds, tmp_path, trainer_kwargs=QUIET, callbacks=[Slow(), Crash(5)],
                    checkpoint_every=2)
    assert (tmp_path / "ckpt" / "last.ckpt").exists() and not (tmp_path / "done.json").exists()
    start = StartStep()
    info = train_stage(model, "instruct", cfg, ds, tmp_path, trainer_kwargs=QUIET, callbacks=[Slow(), start],
                       checkpoint_every=2)
    assert start.step == 4 and info["steps"] == 8 and info["resumed"]
    # its seconds count both parts: steps 1-4 before the crash (from the checkpoint), 5-8 after
    assert info["seconds"] >= 8 * 0.2
    # a finished stage is loaded, not retrained
    again = train_stage(model, "instruct", cfg, ds, tmp_path, trainer_kwargs=QUIET, callbacks=[Crash(0)])
    assert again == info


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from lgemma.training import resolve_precision
    assert resolve_precision("32-true") == "32-true" and resolve_precision("bf16-mixed") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto") == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto") == "bf16-mixed"


def test_eager_and_sdpa_attention_give_the_same_loss(world):
    """`language.attention` changes how the tiny LM computes attention, not what it computes."""
    from lgemma.config import LanguageConfig
    from lgemma.language import tiny_gemma
    ids = torch.randint(8, 60, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                        # left padding in the second row
    losses = []
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        lm = tiny_gemma(LanguageConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, attention=attention), 64)
        labels = ids.clone()
        labels[1, :4] = -100                               # no loss read off a padding position
        losses.append(lm(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
