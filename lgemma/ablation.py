"""The paper's ablation at laptop scale, with error bars.

LLaVA-Gemma varies three design choices and reports one run of each. lgemma reruns every
axis on ShapesWorld, several seeds per cell, so a difference can be told apart from noise:

    {stage 1 on, off} x {vision tiny, small} x {LM tiny, small} x seeds

Every run is an ordinary variant (`runs/ablation/<run>/`, cached and resumable like any
`train_variant` call); stage 0 is shared by all runs that use the same tower or LM, as the
paper's runs share one pretrained CLIP and Gemma. The summary gives, per benchmark, the mean
and 95% confidence interval of each cell, and the effect of each axis as a paired difference
(same seed, same other axes) with its interval.
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
from tqdm.auto import tqdm

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


@dataclass
class Grid:
    """What to run. `levels` maps each axis to its two levels (first = the baseline, as in the
    paper: stage 1 on, the smaller tower, the smaller LM); `budget` and `overrides` are
    `--set` style overrides applied to the `base` preset before the axes."""
    base: str = "tiny"
    levels: dict = field(default_factory=lambda: {
        "align": ("on", "off"), "vision": ("tiny", "small"), "language": ("tiny", "small")})
    seeds: tuple = (0, 1, 2)
    # The paper's recipe (LLaVA-1.5's `mlp2x_gelu` connector, batch 32) on a much shorter schedule
    # than `make train`'s, so that 24 runs fit 40 minutes on a 2-core laptop: every cell is compared
    # at equal (short) steps, which notebook 04 discusses. Float32 and sdpa attention, as the
    # README's grid numbers were measured (without these two, CPUs with native bf16 run it about
    # twice as fast). Fast mode (LGEMMA_FAST=1) uses its own tiny schedule.
    budget: tuple = ("train.align.steps=80", "train.instruct.steps=100", "train.instruct.batch_size=32",
                     "connector.kind=mlp2x_gelu", "train.precision=32-true", "train.stage0.precision=32-true",
                     "language.attention=sdpa")
    overrides: tuple = ()     # the user's own, applied last (they win over the budget)
    folder: str = "ablation"  # runs go to <runs_dir>/<folder>/<run name>/

    def cells(self) -> list[dict]:
        """Every (align, vision, language, seed) combination, baseline first."""
        keys = [*AXES, "seed"]
        values = [self.levels[a] for a in AXES] + [self.seeds]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def run_name(cell: dict) -> str:
    return f"align-{cell['align']}_vision-{cell['vision']}_lm-{cell['language']}_seed{cell['seed']}"


def cell_config(grid: Grid, cell: dict) -> Config:
    """The variant config of one grid cell."""
    from .pipeline import fast_mode, get_config
    cfg = get_config(grid.base, ([] if fast_mode() else list(grid.budget)) + list(grid.overrides))
    if cell["align"] not in ("on", "off"):
        raise ValueError(f"align level {cell['align']!r}: use 'on' or 'off'")
    cfg.train.skip_align = cell["align"] == "off"
    cfg.vision = _size(cell["vision"], cfg.vision, small_vision, VisionConfig, "vision")
    attention = cfg.language.attention  # both LM sizes run the same attention code
    cfg.language = _size(cell["language"], cfg.language, small_language, LanguageConfig, "language")
    cfg.language.attention = attention
    cfg.train.seed = int(cell["seed"])
    cfg.name = f"{grid.folder}/{run_name(cell)}"
    return cfg


def _size(level: str, current, small, cls, axis: str):
    if level == current.name:
        return copy.deepcopy(current)
    if level == "small":
        return small()
    if level == "tiny":
        return cls()
    raise ValueError(f"{axis} level {level!r}: the grid knows 'tiny' and 'small'")


def run_grid(grid: Grid, progress: bool = True, jobs: int = 1) -> pd.DataFrame:
    """Train and evaluate every cell that has no results yet; returns one row per run.

    Resumable: finished runs are read from their `metrics.json`; a run killed halfway
    continues from its last checkpoint (see `train_variant`). `jobs > 1` trains that many
    runs at once, each in its own process on one CPU thread: tiny models use two
    cores better as two runs than as one run on two threads."""
    from .pipeline import train_variant
    cells = grid.cells()
    configs = {run_name(c): cell_config(grid, c) for c in cells}
    train_variants(list(configs.values()), jobs, progress, desc="ablation grid")  # with jobs > 1, the unfinished ones
    rows = []
    bar = tqdm(cells, desc="ablation grid", unit="run", disable=not progress)
    for cell in bar:
        cfg = configs[run_name(cell)]
        bar.set_postfix_str(run_name(cell))
        done = (cfg.run_dir / "metrics.json").exists()
        metrics = train_variant(cfg, progress=progress and not done)
        rows.append({**cell, "run": cfg.name, **benchmarks(metrics)})
    table = pd.DataFrame(rows)
    table.to_csv(configs[run_name(cells[0])].run_dir.parent / "runs.csv", index=False)
    return table


def benchmarks(metrics: dict) -> dict:
    """The ShapesWorld "benchmarks" of one run, flat: overall held-out accuracy, each
    question family, POPE F1 and yes-ratio, the compositional split and the blind gap."""
    pope = metrics["pope"]
    out = {"heldout": metrics["heldout_accuracy"],
           **{t: metrics["per_type"][t] for t in QUESTION_TYPES},
           "pope_f1": pope["all"]["f1"], "pope_adversarial_f1": pope["adversarial"]["f1"],
           "yes_ratio": pope["all"]["yes_ratio"],
           "compositional": metrics["compositional_accuracy"],
           "blind": metrics["heldout_blind_accuracy"],
           "blind_gap": metrics["heldout_accuracy"] - metrics["heldout_blind_accuracy"],
           "train_seconds": metrics["train_seconds"]["total"]}
    return out


BENCHMARKS = ("heldout", *QUESTION_TYPES, "pope_f1", "pope_adversarial_f1", "yes_ratio",
              "compositional", "blind", "blind_gap")


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
    """Per cell (align, vision, language) and benchmark: mean, interval and n over seeds."""
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

    `distinguishable` is True when the interval excludes zero."""
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
              "paper_deltas": paper_deltas()}
    result["side_by_side"] = side_by_side(result["effects"])
    for name, df in result.items():
        df.to_csv(out / f"{name}.csv", index=False)
    if len(result["effects"]):
        plot_effects(result["effects"]).savefig(out / "effects.png", dpi=120, bbox_inches="tight")
    (out / "grid.json").write_text(json.dumps({"base": grid.base, "levels": grid.levels, "seeds": list(grid.seeds),
                                                "budget": list(grid.budget), "overrides": list(grid.overrides)}, indent=2))
    return result


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
