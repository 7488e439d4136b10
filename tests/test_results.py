"""The committed reference results of the ablation grid (results/ablation/, written by `make
ablation`) load and match the grid the code defines: the same cells, seeds, budget points and
columns, and a provenance that says how they were made."""
import pandas as pd
import pytest

from lgemma import ablation

RESULTS = ablation.RESULTS_DIR


@pytest.fixture(scope="module")
def results():
    if not (RESULTS / "runs.csv").exists():
        pytest.fail(f"{RESULTS / 'runs.csv'} is missing: `make ablation` writes it, and it is committed")
    return ablation.read_results(RESULTS)


@pytest.fixture(scope="module")
def runs(results):
    return results[0]


def test_reference_results_cover_the_grid(runs):
    grid = ablation.Grid()
    assert list(runs.columns) == [*ablation.RESULT_COLUMNS, "run"]
    cells = {tuple(c[a] for a in (*ablation.AXES, "seed")) for c in grid.cells()}
    got = {tuple(r) for r in runs[[*ablation.AXES, "seed"]].drop_duplicates().itertuples(index=False)}
    assert got == cells, "results/ablation/runs.csv holds other cells or seeds than ablation.Grid(): rerun make ablation"
    steps = grid.budget_steps()
    for key, g in runs.groupby([*ablation.AXES, "seed"]):
        assert sorted(g.step) == steps, f"{key}: budget points {sorted(g.step)} but the grid scores at {steps}"
    assert runs[list(ablation.BENCHMARKS)].notna().all().all()
    assert (RESULTS / "runs.csv").stat().st_size + (RESULTS / "effects.csv").stat().st_size < 1_000_000


def test_provenance_says_how_they_were_made(runs, results):
    prov = results[1]
    assert {"command", "commit", "machine", "threads", "date", "wall_seconds", "run_training_seconds_total",
            "grid"} <= set(prov)
    assert (RESULTS / "findings.md").exists(), "findings.md is written with the results (ablation.findings_markdown)"
    assert prov["grid"]["budget"] == list(ablation.Grid().budget) and prov["grid"]["seeds"] == list(ablation.Grid().seeds)
    assert prov["runs"] == runs[[*ablation.AXES, "seed"]].drop_duplicates().shape[0]


def test_effects_file_follows_from_runs(runs):
    eff = pd.read_csv(RESULTS / "effects.csv")
    grid = ablation.Grid()
    again = ablation.effects_by_budget(runs, grid)
    got = eff[eff.change.isin(again.change.unique())].sort_values(["step", "axis", "benchmark"])
    again = again.sort_values(["step", "axis", "benchmark"])
    assert got.delta.to_numpy() == pytest.approx(again.delta.to_numpy(), abs=1e-3)
