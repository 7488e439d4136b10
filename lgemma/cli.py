"""`lgemma` command line: data | pretrain-unimodal | train | eval | ablate | demo | course | pack | unpack | export.

Every command takes presets (`tiny`, `tiny-noalign`, ...) or YAML files, and `--set
section.key=value` overrides, e.g.

    lgemma train tiny --set train.instruct.steps=400
    LGEMMA_FAST=1 lgemma train tiny          # seconds, for a quick look
    lgemma train paper-2b-clip --strategy ddp --devices 8 --precision bf16-mixed --accumulate 1
    lgemma eval runs/paper-2b-clip --benchmark pope=/data/pope --benchmark gqa=/data/gqa
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PRESETS


def _configs(args):
    from .pipeline import get_config
    return [get_config(name, [*args.set, *_trainer_overrides(args)]) for name in args.configs]


# `lgemma train` flags for Lightning's Trainer; each is shorthand for a `--set train.<field>=...`
TRAINER_FLAGS = {"strategy": "strategy", "devices": "devices", "num_nodes": "num_nodes", "precision": "precision",
                 "accumulate": "accumulate_grad_batches", "num_workers": "num_workers"}


def _trainer_overrides(args) -> list[str]:
    return [f"train.{field}={getattr(args, flag)}" for flag, field in TRAINER_FLAGS.items()
            if getattr(args, flag, None) is not None]


def _add_trainer_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("scale-out (Lightning Trainer; global batch = batch_size x devices x nodes x accumulate)")
    g.add_argument("--strategy", help="ddp, fsdp, deepspeed_stage_2 (needs deepspeed), ... (train.strategy)")
    g.add_argument("--devices", help="GPUs (or CPU processes) per node, e.g. 8 (train.devices)")
    g.add_argument("--num-nodes", dest="num_nodes", type=int,
                   help="machines, each with --devices GPUs; start one process per GPU with torchrun or srun "
                        "(README: paper scale) (train.num_nodes)")
    g.add_argument("--precision", help="e.g. bf16-mixed, 16-mixed, 32-true (train.precision)")
    g.add_argument("--accumulate", type=int, help="gradient accumulation steps (train.accumulate_grad_batches)")
    g.add_argument("--num-workers", dest="num_workers", type=int, help="DataLoader workers (train.num_workers)")


def _add_common(p: argparse.ArgumentParser, many: bool = True):
    p.add_argument("configs", nargs="*" if many else "?", default=["tiny"],
                   help=f"preset names ({', '.join(PRESETS)}) or YAML config files (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.instruct.steps=400 (repeatable)")


def cmd_data(args):
    from .pipeline import ensure_data
    for cfg in _configs(args):
        root = ensure_data(cfg)
        print(f"data ready in {root}")


def cmd_pretrain(args):
    from .pipeline import ensure_stage0
    for cfg in _configs(args):
        vision, lm = ensure_stage0(cfg)
        print(f"stage 0 ready: vision {vision}, LM {lm}")


def results_table(rows: list[dict]) -> str:
    """A plain-text table of the main metrics of several variants."""
    types = sorted({t for r in rows for t in r.get("per_type", {})})
    head = ["variant", "heldout", "blind", "compositional", "pope_f1", *types, "train_s"]
    lines = [head]
    for r in rows:
        pope = r.get("pope", {}).get("all", {})
        lines.append([r["variant"], f"{r.get('overall_accuracy', float('nan')):.3f}",
                      f"{r.get('blind_accuracy', float('nan')):.3f}",
                      f"{r.get('compositional_accuracy', float('nan')):.3f}", f"{pope.get('f1', float('nan')):.3f}",
                      *[f"{r.get('per_type', {}).get(t, float('nan')):.3f}" for t in types],
                      f"{r['train_seconds']['total']:.0f}"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in lines)


def cmd_train(args):
    from .pipeline import train_variant, train_variants
    t0 = time.time()
    rows = []
    configs = _configs(args)
    train_variants(configs, args.jobs)  # several at once with --jobs (nothing to do otherwise)
    for cfg in configs:
        print(f"\n=== {cfg.name}: {'stage 2 only (skip_align)' if cfg.train.skip_align else 'stage 1 + stage 2'} ===")
        rows.append(train_variant(cfg))
        print(f"{cfg.name}: metrics in {cfg.run_dir / 'metrics.json'}")
    print("\nheld-out exact match (short answers); blind = same questions without the image\n")
    print(results_table(rows))
    print(f"\nwall time {time.time() - t0:.0f} s")


def cmd_eval(args):
    from pathlib import Path

    from .pipeline import evaluate_variant, get_config, load_variant
    if args.benchmark:
        return cmd_eval_benchmarks(args)
    rows = []
    for name in args.configs:  # a run folder, or a preset / YAML whose run is trained
        run_dir = Path(name) if (Path(name) / "model.safetensors").exists() else get_config(name, args.set).run_dir
        model, tokenizer, saved = load_variant(run_dir)
        metrics = evaluate_variant(model, tokenizer, saved)
        old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        metrics = {**old, **metrics, "variant": saved.name, "train_seconds": old.get("train_seconds", {"total": 0})}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rows.append(metrics)
    print(results_table(rows))


def cmd_eval_benchmarks(args):
    """`lgemma eval <model> --benchmark pope=DIR ...`: the paper's benchmarks, beside the paper's table."""
    from .paper_benchmarks import beside_paper, evaluate_model
    benchmarks = {}
    for item in args.benchmark:
        name, _, folder = item.partition("=")
        if not folder:
            raise ValueError(f"--benchmark {item!r} must look like NAME=FOLDER, e.g. pope=/data/pope")
        benchmarks[name] = folder
    for source in args.configs:
        out = args.out if args.out is None or len(args.configs) == 1 else f"{args.out}/{source.rstrip('/').split('/')[-1]}"
        metrics = evaluate_model(source, benchmarks, out, args.set, args.device, args.dtype, args.batch_size,
                                 args.max_questions)
        rows = beside_paper(metrics, f"{metrics['model']} (this run)")
        rows.insert(0, {k: k for k in rows[0]})  # the header
        widths = {k: max(len(r[k]) for r in rows) for k in rows[0]}
        print("\n" + "\n".join("  ".join(r[k].ljust(w) if k == "model" else r[k].rjust(w) for k, w in widths.items())
                                for r in rows))
        print(f"\n{source}: predictions and paper_benchmarks.json in {metrics['out_dir']}")


def _add_eval_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("the paper's benchmarks (configs may also be run folders or transformers Llava folders)")
    g.add_argument("--benchmark", action="append", default=[], metavar="NAME=FOLDER",
                   help="pope, gqa or mmvp and the folder of its official files (repeatable); see README")
    g.add_argument("--out", help="where predictions (resumable) and metrics go (default: <model folder>/paper_benchmarks)")
    g.add_argument("--max-questions", dest="max_questions", type=int,
                   help="only the first N questions (of each POPE split), for a quick look")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="questions answered at once (16)")
    g.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(float32)")


def cmd_ablate(args):
    from . import ablation
    t0 = time.time()
    grid = ablation.Grid(base=args.base, seeds=tuple(args.seeds), folder=args.folder,
                         levels={"align": tuple(args.align), "vision": tuple(args.vision),
                                 "language": tuple(args.language)},
                         overrides=tuple(args.set))
    print(f"ablation grid: {len(grid.cells())} runs ({' x '.join(str(len(v)) for v in grid.levels.values())}"
          f" x {len(grid.seeds)} seeds), finished runs are reused")
    missing = len(ablation.missing_runs(grid))
    table = ablation.run_grid(grid, jobs=args.jobs)
    out = ablation.cell_config(grid, grid.cells()[0]).run_dir.parent
    result = ablation.write_summary(table, grid, out)
    if args.results and (missing or not (Path(args.results) / "runs.csv").exists()):
        # reference results are rewritten only by a command that trained something (or when absent):
        # a cached rerun must not replace the wall time of the run that made them
        command = "lgemma " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("lgemma") else "lgemma ablate"
        ablation.write_results(table, grid, args.results, time.time() - t0, command, missing)
        print(f"reference results written to {args.results}/ (runs.csv, effects.csv, provenance.json)")
    eff = result["effects"]
    if len(eff):
        eff = eff.assign(verdict=eff.apply(ablation.verdict, axis=1))
        print("\neffect of each axis (paired over seeds and the other axes; 95% interval)\n")
        print(eff[["axis", "change", "benchmark", "verdict"]].to_string(index=False))
        print("\nbeside the paper (single runs, other benchmarks and scale: compare directions only)\n")
        print(result["side_by_side"].to_string(index=False))
    print(f"\nresults in {out}/ (runs.csv, summary.csv, effects.csv, effects.png); wall time {time.time() - t0:.0f} s")


def cmd_demo(args):
    import os
    from app.demo import launch, prepare
    t0 = time.time()
    run_dirs = prepare(args.configs or ["tiny", "tiny-noalign"], args.set, args.jobs)  # trains only what is not cached
    print(f"variants ready in {time.time() - t0:.0f} s: {', '.join(map(str, run_dirs))}")
    has_screen = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    launch(run_dirs[0].parent, [d.name for d in run_dirs], args.port, open_browser=bool(has_screen))


def cmd_pack(args):
    from pathlib import Path

    from .pack import pack
    manifest = pack(args.runs, args.out)
    parts = {p for v in manifest["variants"] for p in v["stage0"].values() if p}
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {', '.join(v['name'] for v in manifest['variants'])} and {len(parts)} stage-0 part(s), "
          f"{size / 1e6:.1f} MB (safetensors, json, yaml)")
    print(f"students run `lgemma unpack {Path(args.out).name}` in their lgemma folder: `make demo`, `make lab` "
          "and the notebooks then load these variants and train nothing")


def cmd_unpack(args):
    from .pack import describe, unpack
    print(describe(args.archive))
    for run in unpack(args.archive, args.home, data=not args.no_data):
        print(f"{run}: ready")
    print("nothing left to train: `make demo`, `make lab` and the notebooks load these variants")


def cmd_export(args):
    from .pack import export_transformers
    out = export_transformers(args.run, args.folder)
    print(f"{out}: transformers' LlavaForConditionalGeneration (config, safetensors, tokenizer, processor); "
          f"load it with LlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained")


def _add_sharing(sub) -> None:
    """`lgemma pack | unpack | export`: hand trained variants out (lgemma.pack)."""
    text = "write trained variants, with the stage-0 parts they need, into one zip to hand out"
    p = sub.add_parser("pack", help=text, description=text + " (safetensors, json and yaml only: no pickles)")
    p.add_argument("runs", nargs="+", help="finished run folders, e.g. runs/tiny runs/tiny-noalign")
    p.add_argument("-o", "--out", required=True, help="the zip file to write, e.g. variants.zip")
    p.set_defaults(fn=cmd_pack)
    text = "check a pack and put its variants where make demo, make lab and the notebooks find them"
    p = sub.add_parser("unpack", help=text, description=text + "; nothing is written if any check fails")
    p.add_argument("archive", help="a zip written by `lgemma pack`")
    p.add_argument("--home", help="the folder that holds runs/ and data/ (default: $LGEMMA_HOME, else here)")
    p.add_argument("--no-data", dest="no_data", action="store_true",
                   help="do not generate the variants' ShapesWorld now (it is generated when first needed)")
    p.set_defaults(fn=cmd_unpack)
    text = "write a trained mlp2x_gelu variant as a transformers LlavaForConditionalGeneration folder"
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("run", help="a trained run folder, e.g. runs/tiny-mlp")
    p.add_argument("--to", required=True, choices=["transformers"], help="the format (transformers' Llava)")
    p.add_argument("folder", help="a new or empty folder")
    p.set_defaults(fn=cmd_export)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["course"]:  # course tooling has its own parser: release | grade | run | strip
        from .course import main as course_main
        return course_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lgemma", description="LLaVA-Gemma, small enough to learn from.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("course", help="course tooling: init (an nbgrader course of the assignments) | run | strip "
                                     "(see `lgemma course --help`)")
    for name, fn, text in [
        ("data", cmd_data, "generate ShapesWorld (captions, instruct and eval sets) for the given configs"),
        ("pretrain-unimodal", cmd_pretrain, "stage 0: train the tiny CLIP and the tiny Gemma (cached)"),
        ("train", cmd_train, "data, stage 0, stage 1 (unless skip_align), stage 2 and eval; prints a table"),
        ("eval", cmd_eval, "re-evaluate trained variants (held-out, compositional, blind baseline), or run "
                           "the paper's benchmarks (--benchmark pope=DIR, gqa=DIR, mmvp=DIR)"),
    ]:
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
        if name == "eval":
            _add_eval_flags(p)
        if name == "train":
            _add_trainer_flags(p)
            p.add_argument("--jobs", type=int, default=1,
                           help="variants trained at once, one CPU thread each (2 suits a 2-core laptop; default: 1)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("ablate", help="the paper's ablation grid at toy scale, with seeds and intervals",
                       description="Train every cell of {stage 1 on, off} x {vision} x {LM} x seeds (cached, "
                                   "resumable), then write mean, 95% interval and per-axis effects.")
    p.add_argument("--base", default="tiny", help="preset the grid starts from (default: tiny)")
    p.add_argument("--align", nargs="+", default=["on", "off"], choices=["on", "off"], help="stage 1 levels")
    p.add_argument("--vision", nargs="+", default=["clip", "dino"], choices=["clip", "dino", "tiny", "small"],
                   help="tower levels: the stage-0 objective (clip, dino: the paper's axis) or the CLIP size (tiny, small)")
    p.add_argument("--language", nargs="+", default=["tiny", "small"], choices=["tiny", "small"], help="LM levels")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of stages 1 and 2 (default: 0 1 2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, one CPU thread each (2 suits a 2-core laptop; default: 1)")
    p.add_argument("--folder", default="ablation", help="runs go to <runs_dir>/<folder>/ (default: ablation)")
    p.add_argument("--results", help="also write the small reference results (runs.csv, effects.csv, "
                                     "provenance.json) to this folder, e.g. results/ablation (make ablation does)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the base config, e.g. --set train.instruct.steps=600 (repeatable)")
    p.set_defaults(fn=cmd_ablate)
    text = "train the default variants unless cached, then serve the Gradio demo on 127.0.0.1"
    p = sub.add_parser("demo", help=text, description=text + " (configs default: tiny tiny-noalign)")
    _add_common(p)
    p.add_argument("--port", type=int, default=7860, help="local port (default: 7860)")
    p.add_argument("--jobs", type=int, default=2,
                   help="variants trained at once if not cached, one CPU thread each (default: 2)")
    p.set_defaults(fn=cmd_demo, configs=[])
    _add_sharing(sub)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"lgemma {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
