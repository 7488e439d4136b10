"""Course tooling: student versions of assignments, grading, and running the whole course.

Assignment notebooks mark solutions the nbgrader way:

    def add(a, b):
        ### BEGIN SOLUTION
        return a + b
        ### END SOLUTION

and in markdown `<!-- BEGIN SOLUTION --> ... <!-- END SOLUTION -->`. Code cells with a line
`### AUTOGRADER` hold the tests (plain `assert`s) and are released unchanged.

    lgemma course release [--src notebooks/assignments] [--dst build/student]
    lgemma course grade NOTEBOOK...
    lgemma course run [--out build/course] [NOTEBOOK...]
    lgemma course strip [--check] NOTEBOOK...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ClearOutputPreprocessor

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PLACEHOLDER = 'raise NotImplementedError("exercise: write your solution here")'
MD_PLACEHOLDER = "*(your answer here)*"
_MD_MARKER = re.compile(r"<!--\s*(BEGIN|END) SOLUTION\s*-->")
_AUTOGRADER = re.compile(r"^[ \t]*### AUTOGRADER", re.MULTILINE)
_HINT = f"close every `{BEGIN}` with `{END}` and don't nest them"


def is_autograder(cell) -> bool:
    """True for a code cell with a line starting `### AUTOGRADER`."""
    return cell.cell_type == "code" and bool(_AUTOGRADER.search(cell.source))


def _strip_code(source: str, where: str) -> tuple[str, int]:
    """Replace each solution block by the NotImplementedError line, at the block's indentation."""
    out, indent, n = [], None, 0
    for k, line in enumerate(source.splitlines(keepends=True), 1):
        mark = line.strip()
        if mark == BEGIN:
            if indent is not None:
                raise ValueError(f"{where}, line {k}: nested `{BEGIN}`; {_HINT}")
            indent = line[:len(line) - len(line.lstrip())]
        elif mark == END:
            if indent is None:
                raise ValueError(f"{where}, line {k}: `{END}` without `{BEGIN}`; {_HINT}")
            out.append(indent + PLACEHOLDER + ("\n" if line.endswith("\n") else ""))
            indent, n = None, n + 1
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise ValueError(f"{where}: `{BEGIN}` is never closed; {_HINT}")
    return "".join(out), n


def _strip_markdown(source: str, where: str) -> tuple[str, int]:
    """Replace each `<!-- BEGIN SOLUTION --> ... <!-- END SOLUTION -->` span (markers included)."""
    out, pos, start, n = [], 0, None, 0
    for m in _MD_MARKER.finditer(source):
        if m[1] == "BEGIN":
            if start is not None:
                raise ValueError(f"{where}: nested <!-- BEGIN SOLUTION -->; close each one before the next")
            out.append(source[pos:m.start()])
            start = m.start()
        else:
            if start is None:
                raise ValueError(f"{where}: <!-- END SOLUTION --> without <!-- BEGIN SOLUTION -->")
            out.append(MD_PLACEHOLDER)
            pos, start, n = m.end(), None, n + 1
    if start is not None:
        raise ValueError(f"{where}: <!-- BEGIN SOLUTION --> is never closed with <!-- END SOLUTION -->")
    out.append(source[pos:])
    return "".join(out), n


def _error_text(ename: str, evalue: str) -> str:
    return f"{ename}: {evalue}" if evalue else ename


def _clear_outputs(nb) -> None:
    ClearOutputPreprocessor().preprocess(nb, {})


def release_notebook(src: Path, dst: Path) -> dict:
    """Write the student version of `src` to `dst`: solutions replaced, outputs stripped.

    Returns {notebook, dst, solutions (blocks removed), autograder (test cells kept)}."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"{src}: the student version would overwrite the solutions; pick another destination")
    nb = nbformat.read(src, as_version=4)
    solutions = autograder = 0
    for i, cell in enumerate(nb.cells):
        where = f"{src.name}, cell {i}"
        if is_autograder(cell):
            if BEGIN in cell.source:
                raise ValueError(f"{where}: an autograder cell contains `{BEGIN}`; "
                                 "move the solution to its own cell")
            autograder += 1
        elif cell.cell_type == "code":
            cell.source, n = _strip_code(cell.source, where)
            solutions += n
        elif cell.cell_type == "markdown":
            cell.source, n = _strip_markdown(cell.source, where)
            solutions += n
    _clear_outputs(nb)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    return {"notebook": src.name, "dst": str(dst), "solutions": solutions, "autograder": autograder}


def release(src_dir: Path, dst_dir: Path) -> list[dict]:
    """Release every `*.ipynb` of `src_dir` (not recursive) into `dst_dir`."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: no such folder of assignment notebooks")
    return [release_notebook(p, dst_dir / p.name) for p in sorted(src_dir.glob("*.ipynb"))]


def grade_notebook(path: Path, timeout: int = 600) -> dict:
    """Execute `path` (all cells, errors allowed) and report each autograder cell.

    `timeout` is per cell; a cell that runs longer is interrupted and fails. Returns
    {notebook, score, passed, total, cells: [{cell, passed, error}], error (notebook-level)}."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    tests = [i for i, c in enumerate(nb.cells) if is_autograder(c)]
    if not tests:
        raise ValueError(f"{path}: no autograder cells (code cells with a line `### AUTOGRADER`); nothing to grade")
    executed, errors, current = set(), {}, {"cell": None}

    def on_execute(cell, cell_index):
        current["cell"] = cell_index

    def on_executed(cell, cell_index, execute_reply):
        executed.add(cell_index)

    def on_error(cell, cell_index, execute_reply):
        content = execute_reply["content"]
        errors[cell_index] = _error_text(content.get("ename", "Error"), content.get("evalue", ""))

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=True, interrupt_on_timeout=True,
        error_on_timeout={"ename": "TimeoutError", "evalue": f"cell ran longer than {timeout} s", "traceback": []},
        on_cell_execute=on_execute, on_cell_executed=on_executed, on_cell_error=on_error,
        resources={"metadata": {"path": str(path.parent.resolve())}})
    notebook_error = None
    try:
        client.execute()
    except DeadKernelError:
        notebook_error = f"the kernel died in cell {current['cell']}"
    cells = []
    for i in tests:
        error = errors.get(i)
        if i not in executed:
            error = f"not run: {notebook_error or 'skipped'}"
        cells.append({"cell": i, "passed": error is None, "error": error})
    passed = sum(c["passed"] for c in cells)
    return {"notebook": path.name, "score": passed / len(cells), "passed": passed, "total": len(cells),
            "cells": cells, "error": notebook_error}


@contextlib.contextmanager
def _environ(env: dict | None):
    """Set extra environment variables (inherited by the kernel), restore them afterwards."""
    env = {k: str(v) for k, v in (env or {}).items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_one(path: Path, out_dir: Path, timeout: int) -> dict:
    """Execute one notebook in its folder, stop at the first error, write its HTML rendering."""
    nb = nbformat.read(path, as_version=4)
    current = {"cell": None}

    def on_execute(cell, cell_index):
        current["cell"] = cell_index

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_execute=on_execute,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    error, t0 = None, time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        error = _error_text(e.ename, e.evalue)
    except Exception as e:  # timeout, dead kernel: report it and go on with the next notebook
        error = _error_text(type(e).__name__, (str(e).splitlines() or [""])[0])
    seconds = time.perf_counter() - t0
    body, _ = HTMLExporter().from_notebook_node(nb)
    (out_dir / f"{path.stem}.html").write_text(body, encoding="utf-8")
    cell = current["cell"] if error else None
    return {"name": path.stem, "seconds": round(seconds, 2), "ok": error is None, "cell": cell,
            "error": f"{path.name}, cell {cell}: {error}" if error else None}


def run_notebooks(paths: list[Path], out_dir: Path, timeout: int = 900, env: dict | None = None,
                  verbose: bool = False) -> list[dict]:
    """Run each notebook top to bottom in its own folder; HTML and times.json go to `out_dir`.

    `timeout` is per cell; `env` adds environment variables for the kernels (e.g.
    {"LGEMMA_FAST": "1"}). Returns [{name, seconds, ok, cell, error}]."""
    paths, out_dir = [Path(p) for p in paths], Path(out_dir)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such notebook: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with _environ(env):
        for p in paths:
            results.append(_run_one(p, out_dir, timeout))
            if verbose:
                print(_run_row(results[-1]), flush=True)
    (out_dir / "times.json").write_text(json.dumps(results, indent=2))
    return results


def has_outputs(path: Path) -> bool:
    """True if any code cell of the notebook has outputs or an execution count."""
    nb = nbformat.read(path, as_version=4)
    return any(c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
               for c in nb.cells)


def strip_outputs(path: Path) -> bool:
    """Remove outputs and execution counts in place; True if the file changed."""
    if not has_outputs(path):
        return False
    nb = nbformat.read(path, as_version=4)
    _clear_outputs(nb)
    nbformat.write(nb, path)
    return True


# ---------------------------------------------------------------- CLI

def _run_row(r: dict) -> str:
    return f"{r['name']:<32} {r['seconds']:>8.1f} s  {'ok' if r['ok'] else 'FAILED'}" + (
        f"  {r['error']}" if r["error"] else "")


def _cmd_release(args) -> int:
    rows = release(Path(args.src), Path(args.dst))
    if not rows:
        print(f"lgemma course release: no *.ipynb in {args.src}", file=sys.stderr)
        return 1
    for r in rows:
        print(f"{r['notebook']:<32} {r['solutions']:>3} solutions removed  {r['autograder']:>3} autograder cells")
    print(f"student versions in {args.dst}")
    return 0


def _cmd_grade(args) -> int:
    failed = False
    for nb in args.notebooks:
        try:
            g = grade_notebook(Path(nb), timeout=args.timeout)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed = True
            continue
        failed |= g["passed"] < g["total"]
        print(f"{g['notebook']:<32} {g['passed']}/{g['total']}  score {g['score']:.2f}")
        for c in g["cells"]:
            if not c["passed"]:
                print(f"    cell {c['cell']}: {c['error']}")
    return int(failed)


def _cmd_run(args) -> int:
    paths = [Path(p) for p in args.notebooks] or sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        print("lgemma course run: no notebooks/[0-9][0-9]_*.ipynb here; run from the repo root "
              "or name the notebooks", file=sys.stderr)
        return 1
    env = {"LGEMMA_FAST": "1"} if args.fast else None
    results = run_notebooks(paths, Path(args.out), timeout=args.timeout, env=env, verbose=True)
    bad = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(bad)}/{len(results)} notebooks ok, "
          f"{sum(r['seconds'] for r in results):.0f} s; HTML and times.json in {args.out}")
    return int(bool(bad))


def _cmd_strip(args) -> int:
    changed = [nb for nb in args.notebooks if (has_outputs(nb) if args.check else strip_outputs(nb))]
    for nb in changed:
        print(f"{nb}: {'has outputs' if args.check else 'outputs stripped'}")
    if args.check and changed:
        print("run `lgemma course strip NOTEBOOK...` before committing", file=sys.stderr)
    return int(args.check and bool(changed))


def main(argv: list[str] | None = None) -> int:
    """`lgemma course ...`; returns the exit code (1 if anything failed)."""
    parser = argparse.ArgumentParser(prog="lgemma course", description="Course tooling for the notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("release", help="write student versions of the assignment notebooks")
    p.add_argument("--src", default="notebooks/assignments")
    p.add_argument("--dst", default="build/student")
    p.set_defaults(fn=_cmd_release)
    p = sub.add_parser("grade", help="run notebooks and score their autograder cells")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    p.set_defaults(fn=_cmd_grade)
    p = sub.add_parser("run", help="run course notebooks top to bottom; HTML and times.json in --out")
    p.add_argument("notebooks", nargs="*", help="default: notebooks/[0-9][0-9]_*.ipynb")
    p.add_argument("--out", default="build/course")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    p.add_argument("--fast", action="store_true", help="set LGEMMA_FAST=1 for the kernels")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("strip", help="remove outputs and execution counts from notebooks")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook has outputs")
    p.set_defaults(fn=_cmd_strip)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lgemma course {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
