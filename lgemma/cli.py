"""`lgemma` command line: data | pretrain-unimodal | train | eval | course.

Every command takes presets (`tiny`, `tiny-noalign`, ...) or YAML files, and `--set
section.key=value` overrides, e.g.

    lgemma train tiny --set train.instruct.steps=400
    LGEMMA_FAST=1 lgemma train tiny          # seconds, for a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .config import PRESETS


def _configs(args):
    from .pipeline import get_config
    return [get_config(name, args.set) for name in args.configs]


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
    from .pipeline import train_variant
    t0 = time.time()
    rows = []
    for cfg in _configs(args):
        print(f"\n=== {cfg.name}: {'stage 2 only (skip_align)' if cfg.train.skip_align else 'stage 1 + stage 2'} ===")
        rows.append(train_variant(cfg))
        print(f"{cfg.name}: metrics in {cfg.run_dir / 'metrics.json'}")
    print("\nheld-out exact match (short answers); blind = same questions without the image\n")
    print(results_table(rows))
    print(f"\nwall time {time.time() - t0:.0f} s")


def cmd_eval(args):
    from .pipeline import evaluate_variant, load_variant
    rows = []
    for cfg in _configs(args):
        model, tokenizer, saved = load_variant(cfg.run_dir)
        metrics = evaluate_variant(model, tokenizer, saved)
        old = json.loads((cfg.run_dir / "metrics.json").read_text()) if (cfg.run_dir / "metrics.json").exists() else {}
        metrics = {**old, **metrics, "variant": saved.name, "train_seconds": old.get("train_seconds", {"total": 0})}
        (cfg.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rows.append(metrics)
    print(results_table(rows))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["course"]:  # course tooling has its own parser: release | grade | run | strip
        from .course import main as course_main
        return course_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lgemma", description="LLaVA-Gemma, small enough to learn from.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("course", help="course tooling: release | grade | run | strip (see `lgemma course --help`)")
    for name, fn, text in [
        ("data", cmd_data, "generate ShapesWorld (captions, instruct and eval sets) for the given configs"),
        ("pretrain-unimodal", cmd_pretrain, "stage 0: train the tiny CLIP and the tiny Gemma (cached)"),
        ("train", cmd_train, "data, stage 0, stage 1 (unless skip_align), stage 2 and eval; prints a table"),
        ("eval", cmd_eval, "re-evaluate trained variants (held-out, compositional, blind baseline)"),
    ]:
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"lgemma {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
