"""The paper's ablation at laptop scale, with error bars and budget curves.

LLaVA-Gemma varies three design choices and reports one run of each. lgemma reruns every
axis on ShapesWorld, several seeds per cell, so a difference can be told apart from noise:

    {stage 1 on, off} x {vision CLIP-style, DINO-style} x {LM tiny, small} x seeds

The vision axis is the paper's: a tower trained with language supervision (CLIP) against one
trained on images alone (DINOv2), both the same tiny ViT here. Every run is an ordinary variant
(`runs/ablation/<run>/`, cached and resumable like any `train_variant` call); stage 0 is shared by
all runs that use the same tower or LM, as the paper's runs share one pretrained CLIP and Gemma.
Each run is scored at several points of stage 2 (its budget curve, on a fixed set of held-out
questions), so every effect is a curve: the effect of stage 1 at 1/16 of stage 2 need not be its
effect at the end. The summary gives, per benchmark and budget point, the mean and 95% interval
of each cell, and the effect of each axis as a paired difference (same seed, same other axes)
with its interval; the LM axis also at equal compute (seconds of training).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from scipy import stats

from .config import Config, LanguageConfig, VisionConfig, small_language, small_vision
from .pipeline import train_variants

AXES = ("align", "vision", "language")
QUESTION_TYPES = ("color", "shape", "size", "count", "exist", "spatial")

# Our toy axis -> the paper's comparison. Every delta reads "the change minus the baseline",
# as the paper's ablations do: skipping stage 1, a stronger tower, a larger LM.
PAPER_AXES = {
    "align": ("pretrained_connector", "yes", "no"),   # stage 1 skipped minus done
    "vision": ("vision", "CLIP", "DinoV2"),           # stronger backbone minus CLIP
    "language": ("lm", "gemma-2b-it", "gemma-7b-it"),  # larger LM minus 2B
}
PAPER_BENCHMARKS = ("gqa", "mme_cognition", "mme_perception", "mm_vet", "pope_acc", "pope_f1",
                    "vqav2", "textvqa", "scienceqa_img", "mmvp")


# The grid's recipe, the same for every cell: the `tiny` preset's (its connector `conv_mlp`, whose 3x3
# window gives each visual token its object's shape, and bf16 where the CPU has it) on a shorter
# stage 2: 1,000 steps of batch 32 (the baseline cell reached held-out 0.805 at 800 steps on seed 0,
# too close to the 0.80 target for a seed mean), scored at 1/16, 1/8, 1/4, 1/2 and all of stage 2
# (the budget curve). Fast mode (LGEMMA_FAST=1) uses its own tiny schedule.
GRID_RECIPE = ("train.instruct.steps=1000", "train.curve_points=[0.0625,0.125,0.25,0.5,1.0]")


@dataclass
class Grid:
    """What to run. `levels` maps each axis to its two levels (first = the baseline, as in the
    paper: stage 1 on, the CLIP-style tower, the smaller LM); `budget` and `overrides` are
    `--set` style overrides applied to the `base` preset before the axes. Vision levels: `clip`
    and `dino` (the tower's stage-0 objective, same size), or `tiny` and `small` (CLIP-style
    towers of two sizes); LM levels: `tiny` and `small`."""
    base: str = "tiny"
    levels: dict = field(default_factory=lambda: {
        "align": ("on", "off"), "vision": ("clip", "dino"), "language": ("tiny", "small")})
    seeds: tuple = (0, 1, 2)
    budget: tuple = GRID_RECIPE
    overrides: tuple = ()     # the user's own, applied last (they win over the budget)
    folder: str = "ablation"  # runs go to <runs_dir>/<folder>/<run name>/

    def cells(self) -> list[dict]:
        """Every (align, vision, language, seed) combination, baseline first."""
        keys = [*AXES, "seed"]
        values = [self.levels[a] for a in AXES] + [self.seeds]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]

    def budget_steps(self) -> list[int]:
        """The stage-2 steps at which every run is scored (the same for every cell)."""
        from .pipeline import budget_steps
        return budget_steps(cell_config(self, self.cells()[0]))


def run_name(cell: dict) -> str:
    return f"align-{cell['align']}_vision-{cell['vision']}_lm-{cell['language']}_seed{cell['seed']}"


def cell_config(grid: Grid, cell: dict) -> Config:
    """The variant config of one grid cell."""
    from .pipeline import fast_mode, get_config
    recipe = [b for b in grid.budget if b.startswith("train.curve_points")] if fast_mode() else list(grid.budget)
    cfg = get_config(grid.base, recipe + list(grid.overrides))
    if cell["align"] not in ("on", "off"):
        raise ValueError(f"align level {cell['align']!r}: use 'on' or 'off'")
    cfg.train.skip_align = cell["align"] == "off"
    cfg.vision = _vision(cell["vision"], cfg.vision)
    attention = cfg.language.attention  # both LM sizes run the same attention code
    cfg.language = _size(cell["language"], cfg.language, small_language, LanguageConfig, "language")
    cfg.language.attention = attention
    cfg.train.seed = int(cell["seed"])
    cfg.name = f"{grid.folder}/{run_name(cell)}"
    return cfg


VISION_LEVELS = ("clip", "dino", "tiny", "small")


def _vision(level: str, current: VisionConfig) -> VisionConfig:
    """`clip` / `dino`: the base preset's tower trained by that stage-0 objective (the paper's axis);
    `tiny` / `small`: CLIP-style towers of two sizes."""
    if level in ("clip", "dino"):
        v = copy.deepcopy(current)
        v.objective = level
        return v
    if level in ("tiny", "small"):
        return _size(level, current, small_vision, VisionConfig, "vision")
    raise ValueError(f"vision level {level!r}: the grid knows {', '.join(VISION_LEVELS)}")


def _size(level: str, current, small, cls, axis: str):
    if level == current.name and getattr(current, "objective", "clip") == "clip":
        return copy.deepcopy(current)
    if level == "small":
        return small()
    if level == "tiny":
        return cls()
    raise ValueError(f"{axis} level {level!r}: the grid knows 'tiny' and 'small'")


def run_grid(grid: Grid, progress: bool = True, jobs: int = 1) -> pd.DataFrame:
    """Train and evaluate every cell that has no results yet; returns one row per run and budget
    point (`step`, `seconds` of training so far, the benchmarks), also written to `runs.csv`
    beside the runs. Runs without a budget curve (trained before curves existed, or with
    `train.curve_points` empty) give one row, from their final evaluation.

    Resumable: finished runs are read, not retrained; a run killed halfway continues from its
    last checkpoint (see `train_variant`). `jobs > 1` trains that many runs at once, each in its
    own process on one CPU thread: tiny models use two cores better as two runs than as one run
    on two threads."""
    from .pipeline import train_variant
    cells = grid.cells()
    configs = {run_name(c): cell_config(grid, c) for c in cells}
    train_variants(list(configs.values()), jobs, progress, desc="ablation grid")  # with jobs > 1, the unfinished ones
    rows = []
    for cell in cells:  # with jobs == 1 (or one run left) they train here, one after the other
        cfg = configs[run_name(cell)]
        done = (cfg.run_dir / "metrics.json").exists()
        metrics = train_variant(cfg, progress=progress and not done)
        rows += budget_rows(cell, cfg, metrics)
    table = pd.DataFrame(rows)
    table.to_csv(configs[run_name(cells[0])].run_dir.parent / "runs.csv", index=False)
    return table


def budget_rows(cell: dict, cfg: Config, metrics: dict) -> list[dict]:
    """One row per budget point of a run (from `instruct/curve.json`), or one from its final
    evaluation when it has no curve."""
    curve_file = cfg.run_dir / "instruct" / "curve.json"
    base = {**cell, "run": cfg.name}
    align = metrics["train_seconds"].get("align", 0.0)
    if not curve_file.exists():
        return [{**base, "step": cfg.train.instruct.steps, "seconds": metrics["train_seconds"]["total"],
                 **benchmarks(metrics)}]
    return [{**base, "step": r["step"], "seconds": round(align + r["seconds"], 1), **curve_benchmarks(r)}
            for r in json.loads(curve_file.read_text())]


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's last budget point (the whole stage-2 budget)."""
    return table.sort_values("step").groupby("run", sort=False).tail(1).sort_index()


def benchmarks(metrics: dict) -> dict:
    """The ShapesWorld "benchmarks" of one run's final evaluation, flat: overall held-out accuracy,
    each question family, POPE F1 and yes-ratio, the compositional split and the blind gap."""
    pope = metrics["pope"]
    out = {"heldout": metrics["heldout_accuracy"],
           **{t: metrics["per_type"].get(t, math.nan) for t in QUESTION_TYPES},
           "pope_f1": pope["all"]["f1"], "yes_ratio": pope["all"]["yes_ratio"],
           "compositional": metrics.get("compositional_accuracy", math.nan),
           "blind": metrics["heldout_blind_accuracy"],
           "blind_gap": metrics["heldout_accuracy"] - metrics["heldout_blind_accuracy"]}
    return out


def curve_benchmarks(row: dict) -> dict:
    """The same benchmarks from one budget-curve point (`pipeline.BudgetCurve`, a fixed subset of
    the held-out and compositional questions)."""
    pope = row.get("heldout_pope", {})
    return {"heldout": row["heldout"], **{t: row["heldout_per_type"].get(t, math.nan) for t in QUESTION_TYPES},
            "pope_f1": pope.get("f1", math.nan), "yes_ratio": pope.get("yes_ratio", math.nan),
            "compositional": row.get("compositional", math.nan), "blind": row["heldout_blind"],
            "blind_gap": row["heldout"] - row["heldout_blind"]}


BENCHMARKS = ("heldout", *QUESTION_TYPES, "pope_f1", "yes_ratio", "compositional", "blind", "blind_gap")


# ---------------------------------------------------------------- statistics
def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean and two-sided Student-t confidence interval of independent values.
    With one value the interval is undefined (nan): one run says nothing about noise."""
    x = [float(v) for v in values]
    n, mean = len(x), statistics.fmean(x)
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n}
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(x) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def summarize(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per cell (align, vision, language) and benchmark: mean, interval and n over seeds, at the
    whole stage-2 budget (each run's last budget point)."""
    table = final_rows(table) if "step" in table else table
    rows = []
    for cell, group in table.groupby(list(AXES), sort=False):
        for b in BENCHMARKS:
            rows.append({**dict(zip(AXES, cell)), "benchmark": b, **mean_ci(group[b], confidence)})
    return pd.DataFrame(rows)


def effects(table: pd.DataFrame, grid: Grid, at: dict | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Effect of each axis on each benchmark: second level minus first level, paired on seed
    and the other axes. `at` restricts the other axes (e.g. `{"vision": "tiny", "language":
    "tiny"}` compares only at the baseline, like the paper's one-at-a-time rows); by default
    the effect is averaged over them (the main effect of a factorial design).

    `distinguishable` is True when the interval excludes zero. Measured at the whole stage-2
    budget (each run's last budget point); `effects_by_budget` gives the curve."""
    table = final_rows(table) if "step" in table else table
    rows = []
    for axis in AXES:
        if len(grid.levels[axis]) < 2:  # an axis held fixed has no effect to measure
            continue
        base, other = grid.levels[axis]
        sub = table
        for k, v in (at or {}).items():
            if k != axis:
                sub = sub[sub[k] == v]
        keys = [a for a in AXES if a != axis] + ["seed"]
        a = sub[sub[axis] == base].set_index(keys)
        b = sub[sub[axis] == other].set_index(keys)
        common = a.index.intersection(b.index)
        for bench in BENCHMARKS:
            diff = (b.loc[common, bench] - a.loc[common, bench]).tolist()
            if not diff:
                continue
            ci = mean_ci(diff, confidence)
            rows.append({"axis": axis, "change": f"{other} - {base}", "benchmark": bench,
                         "delta": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "pairs": ci["n"],
                         "distinguishable": bool(ci["n"] > 1 and (ci["lo"] > 0 or ci["hi"] < 0))})
    return pd.DataFrame(rows)


def effects_by_budget(table: pd.DataFrame, grid: Grid, at: dict | None = None,
                      confidence: float = 0.95) -> pd.DataFrame:
    """`effects` at every budget point (column `step`): how an axis' effect changes with the
    stage-2 budget, e.g. stage 1 helping a short stage 2 and not a long one."""
    frames = [effects(g.drop(columns="step"), grid, at, confidence).assign(step=step)
              for step, g in table.groupby("step")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def lm_equal_compute(table: pd.DataFrame, grid: Grid, benchmarks=("heldout", "compositional", "spatial", "shape"),
                     confidence: float = 0.95) -> pd.DataFrame:
    """The LM axis at equal compute: for each pair of runs that differ only in the LM, the larger
    LM's budget curve (interpolated in log seconds) at the training seconds the smaller LM had
    reached at each of its budget points, minus the smaller LM's score there. Points where the
    larger LM has no curve yet (it is slower per step, so its first point comes later) are left
    out. Compare with `effects_by_budget` (equal steps)."""
    import numpy as np
    if len(grid.levels["language"]) < 2:
        return pd.DataFrame()             # one LM in the grid: no LM axis to compare
    base, other = grid.levels["language"][:2]
    rows = []
    for key, g in table.groupby(["align", "vision", "seed"]):
        a, b = g[g.language == base].sort_values("seconds"), g[g.language == other].sort_values("seconds")
        if len(a) == 0 or len(b) < 2:
            continue
        for _, r in a.iterrows():
            if not b.seconds.min() <= r.seconds <= b.seconds.max():
                continue
            for bench in benchmarks:
                value = np.interp(math.log(r.seconds), np.log(b.seconds.to_numpy()), b[bench].to_numpy())
                rows.append({"align": key[0], "vision": key[1], "seed": key[2], "step": r.step,
                             "seconds": r.seconds, "benchmark": bench, "diff": float(value - r[bench])})
    diffs = pd.DataFrame(rows)
    out = []
    for (step, bench), g in (diffs.groupby(["step", "benchmark"]) if len(diffs) else []):
        ci = mean_ci(g["diff"], confidence)
        out.append({"axis": "language", "change": f"{other} - {base} at equal seconds", "step": step,
                    "seconds": g.seconds.mean(), "benchmark": bench, "delta": ci["mean"], "lo": ci["lo"],
                    "hi": ci["hi"], "pairs": ci["n"],
                    "distinguishable": bool(ci["n"] > 1 and (ci["lo"] > 0 or ci["hi"] < 0))})
    return pd.DataFrame(out)


def verdict(row) -> str:
    """A sentence no stronger than the interval: 'no detectable effect' is a valid finding."""
    if row["pairs"] < 2:
        return f"{row['delta']:+.3f} from a single pair: no interval, no claim"
    if not row["distinguishable"]:
        return f"{row['delta']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]: no detectable effect"
    word = "better" if row["delta"] > 0 else "worse"
    if row["benchmark"] in ("blind", "yes_ratio"):
        word = "higher" if row["delta"] > 0 else "lower"
    return f"{row['delta']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]: {word}"


# ---------------------------------------------------------------- reading a trained grid
PLATEAU = 0.02  # a cell has plateaued when its last two budget points differ by at most this (held-out)


def cell_label(cell) -> str:
    """`stage 1 on | clip tower | tiny LM`: one cell (any mapping or row with the three axes)."""
    return f"stage 1 {cell['align']} | {cell['vision']} tower | {cell['language']} LM"


def training_status(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """How trained each cell is at the whole stage-2 budget: held-out mean and interval over seeds,
    blind mean, the seeing-minus-blind gap with its interval, the change of held-out accuracy
    between the last two budget points (mean over seeds; `plateaued` when within `PLATEAU`) and the
    mean training seconds per run (stages 1 + 2)."""
    rows = []
    for cell, g in table.groupby(list(AXES), sort=False):
        steps = sorted(g.step.unique())
        last = g[g.step == steps[-1]].set_index("seed")
        held, gap = mean_ci(last.heldout, confidence), mean_ci(last.blind_gap, confidence)
        change = math.nan
        if len(steps) > 1:
            change = float((last.heldout - g[g.step == steps[-2]].set_index("seed").heldout).mean())
        rows.append({**dict(zip(AXES, cell)), "step": steps[-1], "heldout": held["mean"], "lo": held["lo"],
                     "hi": held["hi"], "blind": float(last.blind.mean()), "gap": gap["mean"], "gap_lo": gap["lo"],
                     "gap_hi": gap["hi"], "seeds": held["n"], "prev_step": steps[-2] if len(steps) > 1 else None,
                     "last_change": change, "plateaued": bool(abs(change) <= PLATEAU),
                     "seconds": float(last.seconds.mean())})
    return pd.DataFrame(rows)


def _interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f}" + ("" if math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]")


def findings(table: pd.DataFrame, grid: Grid, confidence: float = 0.95) -> list[str]:
    """The grid's findings as sentences, each generated from the intervals (no sentence claims more
    than its interval): how trained the baseline is, which cells have not plateaued, stage 1 along
    the budget, the tower per question type, the LM at equal steps and at equal compute, and the
    paper's directions beside ours. Markdown, one finding per item."""
    status = training_status(table, confidence)
    base = {a: grid.levels[a][0] for a in AXES}
    b = status[(status[list(AXES)] == pd.Series(base)).all(axis=1)].iloc[0]
    met = b.heldout >= 0.80 and b.gap >= 0.30
    out = [f"**How trained.** The baseline cell ({cell_label(base)}) ends stage 2 (step {b.step}) at held-out "
           f"{_interval(b.heldout, b.lo, b.hi)} over {b.seeds} seeds, {b.gap:.3f} above its blind score "
           f"({b.blind:.3f}): the target (>= 0.80, >= 0.30 above blind) is {'met' if met else 'NOT met'}."]
    flat = status[status.plateaued]
    open_ = status[~status.plateaued]
    text = f"{len(flat)} of {len(status)} cells have plateaued (held-out moved <= {PLATEAU} over the last budget doubling)"
    if len(open_):
        text += "; not: " + "; ".join(
            f"{cell_label(r)} ({r.last_change:+.3f} from step {r.prev_step} to {r.step})" for _, r in open_.iterrows()
            ) + ". Where a cell still rises, its final numbers understate what a longer stage 2 would reach"
    out.append(f"**Plateau.** {text}.")
    by_budget = effects_by_budget(table, grid, confidence=confidence)
    final = effects(table, grid, confidence=confidence)
    for axis in AXES:
        e = by_budget[(by_budget.axis == axis) & (by_budget.benchmark == "heldout")].sort_values("step")
        if not len(e):
            continue
        if axis == "align":
            steps = "; ".join(f"step {r.step}: {verdict(r)}" for _, r in e.iterrows())
            out.append(f"**Stage 1 along the budget** ({e.change.iloc[0]}, held-out, paired over seeds and the "
                       f"other axes): {steps}.")
        if axis == "vision":
            v = final[(final.axis == "vision") & final.benchmark.isin(QUESTION_TYPES)]
            moved = v[v.distinguishable]
            still = v[~v.distinguishable]
            text = (("moves " + "; ".join(f"{r.benchmark} {verdict(r)}" for _, r in moved.iterrows()))
                    if len(moved) else "moves no question type detectably")
            if len(still):
                text += "; no detectable effect on " + ", ".join(still.benchmark)
            out.append(f"**The tower per question type** ({v.change.iloc[0]}, at the whole budget): {text}.")
        if axis == "language":
            last = e.iloc[-1]
            eq = lm_equal_compute(table, grid, confidence=confidence)
            eq = eq[eq.benchmark == "heldout"].sort_values("step")
            text = f"at equal steps (step {last.step}) {verdict(last)}"
            if len(eq):
                r = eq.iloc[-1]
                text += (f"; at equal compute (the small LM's curve at the {r.seconds:.0f} s the tiny LM trained "
                         f"for its step {r.step}) {verdict(r)}")
            out.append(f"**The bigger LM** ({e.change.iloc[0]}, held-out): {text}.")
    paper = paper_deltas()
    for axis in AXES:
        p, t = paper[paper.axis == axis], final[(final.axis == axis) & final.benchmark.isin(["heldout", *QUESTION_TYPES])]
        if len(p) and len(t):
            out.append(f"**Beside the paper, {axis}.** The paper ({p.change.iloc[0]}, single runs): "
                       f"{int((p.delta > 0).sum())} benchmark deltas up, {int((p.delta < 0).sum())} down. Ours "
                       f"({t.change.iloc[0]}, {len(t)} benchmarks with intervals): "
                       f"{int((t.distinguishable & (t.delta > 0)).sum())} better, "
                       f"{int((t.distinguishable & (t.delta < 0)).sum())} worse, "
                       f"{int((~t.distinguishable).sum())} not distinguishable from zero.")
    return out


def retrain_cell(cell: dict, grid: Grid | None = None, progress: bool = True) -> pd.DataFrame:
    """Train one cell of `grid` here, as `make ablation` would (cached like every run: a second
    call reads it), and return its budget rows (`budget_rows`)."""
    from .pipeline import train_variant
    grid = grid or Grid()
    cell = {**cell, "seed": int(cell.get("seed", grid.seeds[0]))}
    unknown = [a for a in AXES if cell.get(a) not in grid.levels[a]]
    if unknown:
        raise ValueError(f"cell {cell}: {', '.join(unknown)} must be one of "
                         + "; ".join(f"{a}: {', '.join(grid.levels[a])}" for a in unknown))
    cfg = cell_config(grid, cell)
    return pd.DataFrame(budget_rows(cell, cfg, train_variant(cfg, progress=progress)))


def compare_with_reference(local: pd.DataFrame, reference: pd.DataFrame, benchmark: str = "heldout",
                           confidence: float = 0.95) -> pd.DataFrame:
    """A retrained run (`retrain_cell`) beside the reference cell at each budget point, matched by
    the point's rank (the k-th point of each curve: the same fraction of stage 2, also when a
    fast-mode rerun has other step numbers): its score, the reference's mean and interval over
    seeds, the reference run of the same seed, and whether it falls inside the interval."""
    cell = local.iloc[0]
    ref = reference[(reference[list(AXES)] == cell[list(AXES)]).all(axis=1)]
    ref_steps = sorted(ref.step.unique())
    rows = []
    for k, r in enumerate(local.sort_values("step").itertuples()):
        at = ref[ref.step == ref_steps[k]] if k < len(ref_steps) else ref.iloc[:0]
        ci = mean_ci(at[benchmark], confidence) if len(at) else {"mean": math.nan, "lo": math.nan, "hi": math.nan}
        same = at[at.seed == cell.seed][benchmark]
        value = getattr(r, benchmark)
        rows.append({"step here": r.step, "step in reference": ref_steps[k] if k < len(ref_steps) else None,
                     f"{benchmark} here": value, "reference mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"],
                     "reference, same seed": float(same.iloc[0]) if len(same) else math.nan,
                     "inside": bool(ci["lo"] <= value <= ci["hi"]) if not math.isnan(ci["lo"]) else None})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the paper beside it
def paper_table(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's results table (`data/paper/llava_gemma_results.csv`)."""
    path = Path(path) if path else Path(__file__).resolve().parent.parent / "data" / "paper" / "llava_gemma_results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: it ships with the repository (data/paper/)")
    return pd.read_csv(path)


def paper_deltas(paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's per-axis deltas: every pair of rows that differ only in that axis.
    Each is a single run, so there is no interval."""
    paper = paper_table() if paper is None else paper
    cols = {"align": "pretrained_connector", "vision": "vision", "language": "lm"}
    rows = []
    for axis, (col, base, other) in PAPER_AXES.items():
        rest = [c for c in cols.values() if c != col]
        a = paper[paper[col] == base].set_index(rest)
        b = paper[paper[col] == other].set_index(rest)
        for key in a.index.intersection(b.index):
            at = ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            for bench in PAPER_BENCHMARKS:
                d = b.loc[key, bench] - a.loc[key, bench]
                if pd.notna(d):
                    rows.append({"axis": axis, "change": f"{other} - {base}", "at": at,
                                 "benchmark": bench, "delta": float(d)})
    return pd.DataFrame(rows)


def side_by_side(toy_effects: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per axis: the toy deltas (with intervals) next to the paper's (single runs).
    Different scales and benchmarks: compare directions and consistency, not magnitudes."""
    pd_ = paper_deltas(paper)
    rows = []
    for axis in AXES:
        t = toy_effects[toy_effects.axis == axis]
        p = pd_[pd_.axis == axis]
        rows.append({
            "axis": axis,
            "toy change": t.change.iloc[0] if len(t) else "",
            "toy: distinguishable / benchmarks": f"{int(t.distinguishable.sum())} / {len(t)}",
            "toy: better / worse (distinguishable)": f"{int(((t.delta > 0) & t.distinguishable).sum())} / "
                                                    f"{int(((t.delta < 0) & t.distinguishable).sum())}",
            "paper change": p.change.iloc[0] if len(p) else "",
            "paper: up / down (single runs)": f"{int((p.delta > 0).sum())} / {int((p.delta < 0).sum())}",
        })
    return pd.DataFrame(rows)


def write_summary(table: pd.DataFrame, grid: Grid, out_dir: str | Path) -> dict:
    """Write summary.csv, effects.csv, effects_at_baseline.csv and the paper side-by-side
    next to the runs; returns the data frames."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {a: grid.levels[a][0] for a in AXES}
    result = {"summary": summarize(table), "effects": effects(table, grid),
              "effects_at_baseline": effects(table, grid, at=base),
              "effects_by_budget": effects_by_budget(table, grid) if "step" in table else pd.DataFrame(),
              "lm_equal_compute": lm_equal_compute(table, grid) if "seconds" in table else pd.DataFrame(),
              "paper_deltas": paper_deltas()}
    result["side_by_side"] = side_by_side(result["effects"])
    for name, df in result.items():
        df.to_csv(out / f"{name}.csv", index=False)
    if len(result["effects"]):
        plot_effects(result["effects"]).savefig(out / "effects.png", dpi=120, bbox_inches="tight")
    (out / "grid.json").write_text(json.dumps(grid_spec(grid), indent=2))
    return result


def grid_spec(grid: Grid) -> dict:
    """What defines a grid's results: levels, seeds, recipe and budget points."""
    return {"base": grid.base, "levels": {k: list(v) for k, v in grid.levels.items()}, "seeds": list(grid.seeds),
            "budget": list(grid.budget), "overrides": list(grid.overrides), "budget_steps": grid.budget_steps()}


# ---------------------------------------------------------------- reference results (results/ablation/)
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results" / "ablation"
RESULT_COLUMNS = ("align", "vision", "language", "seed", "step", "seconds", *BENCHMARKS)


def write_results(table: pd.DataFrame, grid: Grid, out_dir: str | Path, wall_seconds: float, command: str,
                  trained: int) -> Path:
    """The grid's reference results, small enough to commit: `runs.csv` (one row per run and budget
    point), `effects.csv` (every axis at every budget point, plus the LM at equal compute),
    `provenance.json` (command, commit, machine, threads, date, wall time, grid) and `findings.md`
    (each cell's training status and the findings generated from the intervals)."""
    import datetime
    import os
    import platform
    import subprocess
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = table[list(RESULT_COLUMNS)].copy()
    runs.to_csv(out / "runs.csv", index=False, float_format="%.4f")
    eff = pd.concat([effects_by_budget(table, grid), lm_equal_compute(table, grid)], ignore_index=True)
    eff.to_csv(out / "effects.csv", index=False, float_format="%.4f")
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    from .training import cpu_name
    provenance = {"command": command, "commit": git("rev-parse", "HEAD"),
                  "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
                  "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
                  "threads": "one per worker", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "wall_seconds": round(wall_seconds, 1), "runs_trained_by_this_command": trained,
                  # the runs' own training seconds (stages 1 + 2, from their metrics): the grid's compute
                  # even when it was trained over several invocations (a resumed grid)
                  "run_training_seconds_total": round(float(final_rows(table).seconds.sum()), 1),
                  "runs": int(table.run.nunique()), "grid": grid_spec(grid)}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "findings.md").write_text(findings_markdown(table, grid, provenance))
    return out


def findings_markdown(table: pd.DataFrame, grid: Grid, provenance: dict) -> str:
    """`findings.md`: every cell's training status and the generated findings, with where they came from."""
    status = training_status(table)
    lines = ["# The ablation grid: findings", "",
             f"Generated by `{provenance['command']}` (commit {provenance['commit'][:10]}, {provenance['date']}, "
             f"{provenance['machine']['cpu']}, {provenance['machine']['cores']} cores) from `runs.csv` beside this "
             "file; every sentence is generated from the intervals (`lgemma.ablation.findings`). 95% intervals over "
             "seeds (cells) or paired seeds (effects).", "",
             "| cell | step | held-out [95% interval] | blind | gap | last doubling | plateaued | seconds/run |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in status.iterrows():
        lines.append(f"| {cell_label(r)} | {r.step} | {_interval(r.heldout, r.lo, r.hi)} | {r.blind:.3f} | "
                     f"{r.gap:.3f} | {r.last_change:+.3f} | {'yes' if r.plateaued else 'no'} | {r.seconds:.0f} |")
    lines += ["", *[f"- {f}" for f in findings(table, grid)], ""]
    return "\n".join(lines)


def load_results(grid: Grid | None = None, results_dir: str | Path | None = None) -> tuple[pd.DataFrame, dict, str]:
    """The grid's table: the local runs (`make ablation`) when every run of `grid` exists, else the
    committed reference results. Returns (table, provenance or {}, which: "local" or "reference")."""
    grid = grid or Grid()
    if not missing_runs(grid):
        return run_grid(grid, progress=False), {}, "local"
    folder = Path(results_dir) if results_dir else RESULTS_DIR
    if not (folder / "runs.csv").exists():
        raise FileNotFoundError(f"{folder / 'runs.csv'} not found and the local grid is incomplete: run "
                                f"`make ablation` to train it (hours on a 2-core CPU: see the README)")
    return (*read_results(folder), "reference")


def read_results(folder: str | Path = RESULTS_DIR) -> tuple[pd.DataFrame, dict]:
    """The files `write_results` wrote in `folder`: (runs table with its `run` names, provenance)."""
    folder = Path(folder)
    table = pd.read_csv(folder / "runs.csv")
    table["run"] = table.apply(lambda r: run_name(r.to_dict()), axis=1)
    return table, json.loads((folder / "provenance.json").read_text())


def plot_effects(effects_df: pd.DataFrame, benchmarks=BENCHMARKS):
    """One panel per axis: each benchmark's delta with its 95% interval; zero marked.
    Filled markers are distinguishable from zero, hollow ones are not."""
    import matplotlib.pyplot as plt
    axes_present = list(dict.fromkeys(effects_df.axis))
    fig, axs = plt.subplots(1, len(axes_present), figsize=(4.2 * len(axes_present), 4.5), sharey=True, squeeze=False)
    for ax, axis in zip(axs[0], axes_present):
        e = effects_df[effects_df.axis == axis].set_index("benchmark").reindex([b for b in benchmarks])
        e = e.dropna(subset=["delta"])
        y = range(len(e))
        err = [(e.delta - e.lo).fillna(0), (e.hi - e.delta).fillna(0)]
        ax.errorbar(e.delta, y, xerr=err, fmt="none", ecolor="gray", capsize=3)
        for yi, (_, r) in zip(y, e.iterrows()):
            ax.plot(r.delta, yi, "o", color="C0", mfc="C0" if r.distinguishable else "white")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(list(y), list(e.index))
        ax.invert_yaxis()
        ax.set_title(f"{axis}: {e.change.iloc[0]}" if len(e) else axis, fontsize=10)
        ax.set_xlabel("delta (95% interval over paired runs)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- diagnosing failures
def run_dirs(grid: Grid) -> dict[str, Path]:
    """Run name -> folder, for every cell of `grid` (trained or not)."""
    return {run_name(c): cell_config(grid, c).run_dir for c in grid.cells()}


def missing_runs(grid: Grid) -> list[str]:
    """Cells of `grid` without results yet (an empty list: the grid is complete)."""
    return [name for name, d in run_dirs(grid).items() if not (d / "metrics.json").exists()]


def loss_curves(table: pd.DataFrame, grid: Grid, stage: str = "instruct") -> pd.DataFrame:
    """Training loss of every run of `table` in `stage` ("align" or "instruct"), one row per
    logged step, with the wall-clock seconds at that step (the stage's measured time spread
    evenly over its steps): plot against `step` for equal steps, `seconds` for equal compute."""
    from .training import loss_curve
    dirs, rows = run_dirs(grid), []
    for r in table.itertuples():
        run = dirs[run_name(r._asdict())]
        curve = loss_curve(run / stage)
        if not curve:
            continue
        steps = json.loads((run / stage / "done.json").read_text()).get("steps", curve[-1][0] + 1) \
            if (run / stage / "done.json").exists() else curve[-1][0] + 1
        seconds = json.loads((run / "metrics.json").read_text())["train_seconds"].get(stage, math.nan)
        for step, loss in curve:
            rows.append({"align": r.align, "vision": r.vision, "language": r.language, "seed": r.seed,
                         "step": step, "loss": loss, "seconds": (step + 1) * seconds / max(steps, 1)})
    return pd.DataFrame(rows)


def looking_stats(grid: Grid, seed: int | None = None, n: int = 16, qtype: str = "color") -> pd.DataFrame:
    """Per cell (one seed): how the LM receives and uses the image on `n` held-out `qtype`
    questions. Visual-token norm relative to text tokens (`interpret.token_norm_stats`) and the
    share of the answer token's attention that lands on image tokens, per layer
    (`interpret.attention_mass`), averaged over heads and questions."""
    import torch
    from .interpret import attention_mass, teacher_forced, token_norm_stats
    from .pipeline import ImageSource, load_variant, records
    seed = grid.seeds[0] if seed is None else seed
    rows = []
    for cell in grid.cells():
        if cell["seed"] != seed:
            continue
        run = cell_config(grid, cell).run_dir
        if not (run / "model.safetensors").exists():
            continue
        model, tok, cfg = load_variant(run)
        source = ImageSource(cfg, model.vision)
        recs = [r for r in records(cfg, "heldout") if r["question_type"] == qtype][:n]
        masses, norms = [], []
        for r in recs:
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
            px = source.pixels(r)
            masses.append(attention_mass(teacher_forced(model, tok, q, a, px))["image"].mean(-1))  # [L]
            norms.append(token_norm_stats(model, tok, px[None], q)["ratio"])
        mass = torch.stack(masses).mean(0)
        rows.append({**{a: cell[a] for a in AXES},
                     "visual/text norm": sum(norms) / len(norms),
                     **{f"image attention L{i}": float(m) for i, m in enumerate(mass)},
                     "image attention (mean of layers)": float(mass.mean())})
    return pd.DataFrame(rows)
