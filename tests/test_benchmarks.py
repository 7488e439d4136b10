"""Smoke test of benchmarks/speed_vs_transformers.py at toy size, so the script cannot rot."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_vs_transformers.py"


def _bench():
    spec = importlib.util.spec_from_file_location("speed_vs_transformers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_and_reports_ratios(tmp_path, capsys):
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--size", "tiny", "--device", "cpu", "--threads", "1", "--rounds", "1",
                          "--no-memory", "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    assert abs(res["losses"]["lgemma"] - res["losses"]["transformers"]) < 1e-3   # same weights, same loss
    assert res["train_speedup"] > 0 and res["generate_speedup"] > 0
    assert set(res["vs_reference"]) == {"lgemma", "lgemma+selective"}              # both checkpointing modes
    assert set(res["train_step_s"]) == {"lgemma", "lgemma+selective", "transformers"}
    out = capsys.readouterr().out
    assert (tmp_path / "r.json").exists() and "speed vs reference" in out and "targets for lgemma+selective" in out


def test_memory_workers_measure_each_implementation_in_a_fresh_process():
    """As the script measures memory: one fresh process per implementation (in this test's process,
    whose heap already holds freed pages, a toy step would not raise the resident size at all)."""
    from argparse import Namespace
    bench = _bench()
    args = Namespace(checkpointing=["off", "selective"], size="tiny", batch=2, dtype="float32", threads=1)
    mem = bench.measure_memory(args, "cpu")
    assert set(mem) == {"lgemma", "lgemma+selective", "transformers"}
    for m in mem.values():
        assert set(m) == {"peak", "resident", "step"} and m["peak"] > 0 and m["resident"] > 0


def test_tiny_step_benchmark_times_every_setting(capsys):
    """benchmarks/tiny_step.py at a toy batch: every precision x attention x activation setting is timed."""
    path = SCRIPT.parent / "tiny_step.py"
    spec = importlib.util.spec_from_file_location("tiny_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        res = module.main(["--threads", "1", "--steps", "1", "--batch", "2", "--length", "96"])
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"/".join(s) for s in module.SETTINGS} and all(t > 0 for t in res.values())
    assert "vs float32 + sdpa" in capsys.readouterr().out


def test_paper_step_reports_throughput_and_mfu(capsys):
    """benchmarks/paper_step.py (the GPU check of a paper preset at its real size) at toy size on a CPU."""
    spec = importlib.util.spec_from_file_location("paper_step", SCRIPT.parent / "paper_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--precision", "32-true", "--batch", "2",
                       "--prompt", "4", "--answer", "6", "--peak-tflops", "1"])
    assert res["tokens_per_step"] == 2 * (1 + 64 + 4 + 6) and res["tokens_per_s"] > 0 and len(res["steps_s"]) == 2
    assert 0 < res["mfu"] < 1 and res["checkpointing"] == "full" and res["model_tflops_per_step"] > 0
    model, _ = module.build("paper-2b-clip", "tiny")
    b = next(module.batches(model, 2, 4, 6))
    lm_body = sum(p.numel() for p in model.lm.parameters()) - model.lm.get_input_embeddings().weight.numel()
    assert module.model_flops(model, b) > 6 * lm_body * b["input_ids"].numel()   # plus head, attention, tower
