"""lgemma.ablation: the statistics against hand-computed values, and a real 2x1x1x2 mini-grid
in fast mode (trained, summarized, resumed without retraining)."""
import json
import math

import pandas as pd
import pytest

from lgemma import ablation, cli


def test_mean_ci_matches_a_hand_computed_t_interval():
    # 0.5, 0.7, 0.6: mean 0.6, sample sd 0.1, t(0.975, df=2) = 4.302653 (printed t tables)
    ci = ablation.mean_ci([0.5, 0.7, 0.6])
    half = 4.302653 * 0.1 / math.sqrt(3)  # 0.248414
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.6)
    assert ci["lo"] == pytest.approx(0.6 - half, abs=1e-6) and ci["hi"] == pytest.approx(0.6 + half, abs=1e-6)
    # two values: t(0.975, df=1) = 12.706205
    ci = ablation.mean_ci([1.0, 2.0])
    assert ci["hi"] - ci["mean"] == pytest.approx(12.706205 * math.sqrt(0.5) / math.sqrt(2), abs=1e-5)
    # one run has no interval: the paper's situation
    one = ablation.mean_ci([0.8])
    assert one["mean"] == 0.8 and math.isnan(one["lo"]) and math.isnan(one["hi"])


def _table(deltas_by_seed, step=100):
    """A synthetic 2x1x1 grid whose 'off' runs differ from 'on' by the given per-seed deltas."""
    rows = []
    for seed, d in enumerate(deltas_by_seed):
        base = {b: 0.5 for b in ablation.BENCHMARKS}
        for align, delta in (("on", 0.0), ("off", d)):
            cell = {"align": align, "vision": "clip", "language": "tiny", "seed": seed}
            rows.append({**cell, "run": ablation.run_name(cell), "step": step, "seconds": step / 10,
                         **{b: v + delta for b, v in base.items()}})
    return pd.DataFrame(rows)


def test_effects_are_paired_differences_with_a_verdict_no_stronger_than_the_interval():
    grid = ablation.Grid(levels={"align": ("on", "off"), "vision": ("clip",), "language": ("tiny",)}, seeds=(0, 1, 2))
    clear = ablation.effects(_table([0.10, 0.12, 0.11]), grid)
    assert set(clear.axis) == {"align"}           # axes held fixed have no effect row
    row = clear[clear.benchmark == "heldout"].iloc[0]
    assert row.change == "off - on" and row.pairs == 3
    assert row.delta == pytest.approx(0.11)
    assert row.hi - row.delta == pytest.approx(4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert row.distinguishable and "worse" not in ablation.verdict(row) and "better" in ablation.verdict(row)
    noisy = ablation.effects(_table([0.10, -0.12, 0.03]), grid)
    row = noisy[noisy.benchmark == "heldout"].iloc[0]
    assert not row.distinguishable and "no detectable effect" in ablation.verdict(row)


def test_paper_deltas_follow_the_papers_table():
    d = ablation.paper_deltas()
    # gemma-2b-it, CLIP: GQA 0.531 with stage 1, 0.481 without -> skipping stage 1: -0.050
    row = d[(d.axis == "align") & (d.benchmark == "gqa") & (d["at"] == "CLIP, gemma-2b-it")].iloc[0]
    assert row.delta == pytest.approx(0.481 - 0.531)
    row = d[(d.axis == "language") & (d.benchmark == "mmvp") & (d["at"] == "yes, CLIP")].iloc[0]
    assert row.delta == pytest.approx(0.327 - 0.287)


def test_mini_grid_trains_summarizes_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LGEMMA_FAST", "1")
    monkeypatch.chdir(tmp_path)
    args = ["ablate", "--vision", "tiny", "--language", "tiny", "--seeds", "0", "1"]
    assert cli.main(args + ["--jobs", "2"]) == 0      # two runs at a time, in worker processes
    out = capsys.readouterr().out
    assert "effect of each axis" in out and "beside the paper" in out
    folder = tmp_path / "runs-fast" / "ablation"
    runs = pd.read_csv(folder / "runs.csv")
    assert runs.run.nunique() == 4 and set(runs["align"]) == {"on", "off"} and set(runs.seed) == {0, 1}
    # every run scored at every budget point of stage 2, with the training seconds so far
    grid = ablation.Grid(levels={"align": ("on", "off"), "vision": ("tiny",), "language": ("tiny",)}, seeds=(0, 1))
    steps = grid.budget_steps()
    assert len(steps) == 5 and all(sorted(g.step) == steps for _, g in runs.groupby("run"))
    assert all(g.sort_values("step").seconds.is_monotonic_increasing for _, g in runs.groupby("run"))
    final = ablation.final_rows(runs)
    summary = pd.read_csv(folder / "summary.csv")
    cell = summary[(summary["align"] == "on") & (summary.benchmark == "heldout")].iloc[0]
    assert cell.n == 2 and cell["mean"] == pytest.approx(final[final["align"] == "on"].heldout.mean())
    by_budget = pd.read_csv(folder / "effects_by_budget.csv")
    assert sorted(by_budget.step.unique()) == steps and set(by_budget.axis) == {"align"}
    assert (folder / "effects.png").stat().st_size > 0 and (folder / "effects.csv").exists()
    # stage 0 was trained once and shared by every run
    assert len(list((tmp_path / "runs-fast" / "stage0").glob("vision-*"))) == 1
    # a grid run loads with that shared stage 0 (it once looked for, and retrained, its own)
    looks = ablation.looking_stats(ablation.Grid(levels={"align": ("on",), "vision": ("tiny",), "language": ("tiny",)},
                                                 seeds=(0,)), n=1)
    assert len(looks) == 1 and not (folder / "stage0").exists()

    # resume: one run "killed" before it finished, the others untouched
    done = {p: p.stat().st_mtime_ns for p in folder.glob("*/metrics.json")}
    victim = folder / ablation.run_name({"align": "off", "vision": "tiny", "language": "tiny", "seed": 1})
    (victim / "metrics.json").unlink()
    (victim / "model.safetensors").unlink()
    trained = []
    import lgemma.pipeline as pipeline
    real = pipeline.build_model
    monkeypatch.setattr(pipeline, "build_model", lambda cfg, *a, **k: trained.append(cfg.name) or real(cfg, *a, **k))
    assert cli.main(args) == 0
    assert trained == [f"ablation/{victim.name}"]   # only the unfinished run trained again
    for p, t in done.items():
        if p.parent != victim:
            assert p.stat().st_mtime_ns == t
    again = pd.read_csv(folder / "runs.csv")
    assert again.run.nunique() == 4 and len(again) == len(runs)
    assert json.loads((victim / "metrics.json").read_text())["variant"] == f"ablation/{victim.name}"


def test_effects_by_budget_and_the_lm_at_equal_compute():
    """Stage 1's effect fades with budget (planted); the small LM, 2x slower per step, is compared with
    the tiny one where both curves have points at the same training seconds (interpolated in log seconds)."""
    grid = ablation.Grid(levels={"align": ("on", "off"), "vision": ("clip",), "language": ("tiny",)}, seeds=(0, 1, 2))
    curve = pd.concat([_table([0.10, 0.12, 0.11], step=100), _table([0.01, -0.01, 0.0], step=800)])
    by = ablation.effects_by_budget(curve, grid)
    early, late = (by[(by.step == s) & (by.benchmark == "heldout")].iloc[0] for s in (100, 800))
    assert early.distinguishable and early.delta == pytest.approx(0.11)
    assert not late.distinguishable and late.delta == pytest.approx(0.0)
    # the final-budget effect is the last point's
    assert ablation.effects(curve, grid).query("benchmark == 'heldout'").delta.iloc[0] == pytest.approx(0.0)

    rows = []
    for seed in (0, 1, 2):
        for lm, per_step, gain in (("tiny", 1.0, 0.0), ("small", 2.0, 0.05 + 0.01 * seed)):
            for step in (100, 200, 400, 800):
                cell = {"align": "on", "vision": "clip", "language": lm, "seed": seed}
                # accuracy grows with log seconds the same way for both; the small LM adds `gain`
                seconds = step * per_step
                rows.append({**cell, "run": ablation.run_name(cell), "step": step, "seconds": seconds,
                             **{b: 0.1 * math.log(seconds) + gain for b in ablation.BENCHMARKS}})
    lm_grid = ablation.Grid(levels={"align": ("on",), "vision": ("clip",), "language": ("tiny", "small")}, seeds=(0, 1, 2))
    eq = ablation.lm_equal_compute(pd.DataFrame(rows), lm_grid)
    held = eq[eq.benchmark == "heldout"]
    # the small LM's first point is at 200 s: tiny points at 200, 400 and 800 s are comparable, 100 s is not
    assert sorted(held.step) == [200, 400, 800]
    assert held.delta.to_numpy() == pytest.approx([0.06, 0.06, 0.06])
    # at equal steps the small LM also got twice the seconds: log(2) * 0.1 more
    steps = ablation.effects_by_budget(pd.DataFrame(rows), lm_grid).query("benchmark == 'heldout'")
    assert steps.delta.to_numpy() == pytest.approx([0.06 + 0.1 * math.log(2)] * 4)


def test_reference_results_round_trip_with_their_provenance(tmp_path, monkeypatch):
    """write_results -> the small committed files; load_results reads them when the local grid is
    missing, and says so."""
    monkeypatch.setenv("LGEMMA_HOME", str(tmp_path))         # no local runs here
    grid = ablation.Grid(levels={"align": ("on", "off"), "vision": ("clip",), "language": ("tiny",)}, seeds=(0, 1, 2))
    table = pd.concat([_table([0.10, 0.12, 0.11], step=100), _table([0.01, -0.01, 0.0], step=800)], ignore_index=True)
    out = ablation.write_results(table, grid, tmp_path / "results", 12.34, "lgemma ablate --results x", trained=6)
    assert {p.name for p in out.iterdir()} == {"runs.csv", "effects.csv", "provenance.json", "findings.md"}
    assert "off - on" in (out / "findings.md").read_text()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"] == "lgemma ablate --results x" and prov["wall_seconds"] == 12.3
    assert prov["runs"] == 6 and prov["runs_trained_by_this_command"] == 6 and prov["machine"]["cores"] > 0
    assert sum(p.stat().st_size for p in out.iterdir()) < 1e6
    loaded, prov2, which = ablation.load_results(grid, out)
    assert which == "reference" and prov2 == prov
    assert list(loaded.columns[:len(ablation.RESULT_COLUMNS)]) == list(ablation.RESULT_COLUMNS)
    assert sorted(loaded.run.unique()) == sorted(table.run.unique()) and len(loaded) == len(table)
    with pytest.raises(FileNotFoundError, match="make ablation"):
        ablation.load_results(grid, tmp_path / "nothing")


def test_training_status_findings_and_a_rerun_beside_the_reference():
    """How trained each cell is (gap to blind, plateau over the last budget doubling), the findings
    generated from the intervals, and one rerun compared with the reference cell's interval."""
    grid = ablation.Grid(levels={"align": ("on", "off"), "vision": ("clip",), "language": ("tiny",)}, seeds=(0, 1, 2))
    early = _table([0.10, 0.12, 0.11], step=100)
    late = _table([0.01, -0.01, 0.0], step=800)
    late.loc[late["align"] == "on", "heldout"] = [0.83, 0.85, 0.84]   # the baseline keeps rising: 0.5 -> 0.84
    late.loc[late["align"] == "off", "heldout"] = [0.61, 0.63, 0.62]  # the other cell: 0.61 -> 0.62, flat
    late["blind"], late["blind_gap"] = 0.4, late.heldout - 0.4
    table = pd.concat([early, late], ignore_index=True)
    status = ablation.training_status(table).set_index("align")
    assert status.loc["on", "heldout"] == pytest.approx(0.84) and status.loc["on", "gap"] == pytest.approx(0.44)
    assert status.loc["on", "last_change"] == pytest.approx(0.34) and not status.loc["on", "plateaued"]
    assert status.loc["off", "last_change"] == pytest.approx(0.01) and status.loc["off", "plateaued"]
    found = ablation.findings(table, grid)
    assert "target (>= 0.80, >= 0.30 above blind) is met" in found[0]
    assert "1 of 2 cells have plateaued" in found[1] and "stage 1 on | clip tower | tiny LM (+0.340" in found[1]
    stage1 = next(f for f in found if f.startswith("**Stage 1"))
    assert "step 100: +0.110" in stage1 and "better" in stage1 and "step 800: -0.220" in stage1
    # a rerun of the baseline (seed 1), 0.01 above its reference run at every point, other step numbers
    mine = table[(table["align"] == "on") & (table.seed == 1)].assign(step=lambda d: d.step // 10)
    mine["heldout"] += 0.01
    cmp = ablation.compare_with_reference(mine, table)
    assert list(cmp["step in reference"]) == [100, 800] and list(cmp["step here"]) == [10, 80]
    assert cmp["reference, same seed"].tolist() == pytest.approx([0.5, 0.85])
    assert cmp["heldout here"].tolist() == pytest.approx([0.51, 0.86]) and cmp.inside.tolist() == [False, True]
