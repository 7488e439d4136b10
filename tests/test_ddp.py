"""Scale-out through Lightning's strategies: `lgemma train --strategy ddp --devices 2` really runs
two processes (CPU, gloo), with gradient accumulation and bf16, and rank 0 alone writes the run.

Lightning's DDP launcher starts rank 1 by re-running the same command line, so the test runs the
CLI in a subprocess, exactly as a user would (`lgemma train paper-2b-clip --strategy ddp --devices 8`
on a GPU node). The config is the `paper-2b-dinov2` preset on tiny random stand-ins (a DINOv2 and
a Gemma folder, a few LLaVA-format records), so nothing needs stage 0 and it takes seconds."""
import json
import os
import subprocess
import sys

from PIL import Image

from lgemma.config import LanguageConfig, get_preset
from lgemma.language import tiny_gemma
from lgemma.training import trainer_settings


def test_config_reaches_the_trainer():
    cfg = get_preset("paper-7b-clip")
    assert trainer_settings(cfg.train) == {"precision": "bf16-mixed", "strategy": "fsdp", "devices": 8,
                                           "num_nodes": 1, "accumulate_grad_batches": 1}


def test_num_nodes_flag_reaches_the_trainer(capsys):
    """`lgemma train --num-nodes 2` -> train.num_nodes -> Lightning's Trainer (2 nodes x 1 process here)."""
    import argparse

    import lightning as L
    import pytest

    from lgemma import cli
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--num-nodes" in capsys.readouterr().out
    args = argparse.Namespace(configs=["paper-2b-clip"], set=[], strategy="ddp", devices="1", num_nodes=2,
                              precision="32-true", accumulate=None, num_workers=None)
    cfg, = cli._configs(args)
    settings = trainer_settings(cfg.train)
    assert cfg.train.num_nodes == 2 and settings["num_nodes"] == 2
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **settings)
    assert trainer.num_nodes == 2 and trainer.world_size == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


def _standin_run_config(root, tokenizer):
    from transformers import Dinov2Config, Dinov2Model
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(root / "dinov2")
    tiny_gemma(LanguageConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64),
               len(tokenizer)).save_pretrained(root / "gemma")
    tokenizer.save_pretrained(root / "gemma")
    data = root / "llava"
    (data / "images").mkdir(parents=True)
    recs = []
    for k in range(8):
        Image.new("RGB", (20 + 4 * k, 28), (30 * k, 100, 200)).save(data / "images" / f"{k}.png")
        recs.append({"id": str(k), "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "blue"}]})
    for f in ("blip_laion_cc_sbu_558k.json", "llava_v1_5_mix665k.json"):
        (data / f).write_text(json.dumps(recs))
    cfg = get_preset("paper-2b-dinov2")
    cfg.name, cfg.runs_dir, cfg.data.root = "ddp", str(root / "runs"), str(data)
    cfg.vision.name, cfg.vision.image_size = f"dinov2:{root / 'dinov2'}", 28
    cfg.language.name = str(root / "gemma")
    t = cfg.train
    t.strategy, t.devices, t.precision, t.num_workers = "auto", 1, "32-true", 0   # the CLI flags set them
    t.align.steps, t.instruct.steps, t.align.batch_size, t.instruct.batch_size = 3, 2, 2, 2
    cfg.to_yaml(root / "ddp.yaml")
    return cfg


def test_cli_trains_with_ddp_on_two_cpu_processes(tmp_path, tokenizer):
    cfg = _standin_run_config(tmp_path, tokenizer)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "lgemma.cli", "train", str(tmp_path / "ddp.yaml"), "--strategy", "ddp",
           "--devices", "2", "--accumulate", "2", "--precision", "bf16-mixed"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = cfg.run_dir
    for stage, steps in (("align", 3), ("instruct", 2)):
        done = json.loads((run / stage / "done.json").read_text())
        assert done["strategy"] == "DDPStrategy" and done["world_size"] == 2, done
        assert done["steps"] == steps and done["accumulate_grad_batches"] == 2 and done["precision"] == "bf16-mixed"
    saved = (run / "config.yaml").read_text()
    assert "strategy: ddp" in saved and "devices: 2" in saved and "accumulate_grad_batches: 2" in saved
    metrics = json.loads((run / "metrics.json").read_text())  # written by rank 0 only
    assert metrics["variant"] == "ddp" and "global_rank" not in metrics
    assert (run / "model.safetensors").exists()
