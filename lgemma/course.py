"""Course tooling: an nbgrader course of lgemma's assignments, and running the course notebooks.

Grading is nbgrader's job, not ours: the assignments in `notebooks/assignments/<id>/<id>.ipynb` are
nbgrader source notebooks (every cell carries `metadata.nbgrader`), and course staff run nbgrader's
own commands on them. This module only adds what nbgrader cannot know:

    lgemma course init COURSE [--src notebooks/assignments] [--course-id lgemma]
        an nbgrader course folder: nbgrader_config.py (course id, time limit per cell), source/
        with lgemma's assignments, submitted/ for the students' notebooks. Then, in COURSE:
        nbgrader generate_assignment A1_building_blocks  ->  release/ (the student version)
        nbgrader autograde A1_building_blocks --create   ->  autograded/ + scores in gradebook.db
        nbgrader generate_feedback A1_building_blocks    ->  feedback/ (HTML per student)
    lgemma course run [--out build/course] [NOTEBOOK...]   every course notebook, HTML + times
    lgemma course strip [--check] NOTEBOOK...              outputs removed before committing
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbclient.util import run_sync
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ClearOutputPreprocessor

ASSIGNMENTS = Path(__file__).resolve().parent.parent / "notebooks" / "assignments"
CELL_TIMEOUT = 300  # seconds per cell in nbgrader's runs: every assignment takes minutes on 2 CPU cores
NBGRADER_CONFIG = """\
# nbgrader configuration of an lgemma course, written by `lgemma course init`.
# Run nbgrader's commands in this folder (see lgemma's README, "For teachers").
c = get_config()
c.CourseDirectory.course_id = {course_id!r}
# A cell running longer than this is interrupted and its tests fail (the assignments take
# seconds to a couple of minutes in all on a 2-core laptop).
c.Execute.timeout = {timeout}
c.Execute.interrupt_on_timeout = True
# nbgrader waits only 4 s for a cell's last outputs by default, too short on a busy laptop
c.Execute.iopub_timeout = 60
"""


def _error_text(ename: str, evalue: str) -> str:
    return f"{ename}: {evalue}" if evalue else ename


def _clear_outputs(nb) -> None:
    ClearOutputPreprocessor().preprocess(nb, {})


def assignments(src: Path = ASSIGNMENTS) -> dict[str, Path]:
    """nbgrader assignments under `src`: {assignment id: its folder}, for every `<id>/<id>.ipynb`."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder of assignments (nbgrader's source layout, "
                                f"<assignment>/<notebook>.ipynb); pass --src")
    found = {d.name: d for d in sorted(src.iterdir()) if d.is_dir() and list(d.glob("*.ipynb"))}
    if not found:
        raise FileNotFoundError(f"{src}: no assignment folders with notebooks (<assignment>/<notebook>.ipynb)")
    return found


def init_course(folder: Path, src: Path = ASSIGNMENTS, course_id: str = "lgemma",
                timeout: int = CELL_TIMEOUT) -> dict:
    """Create (or complete) the nbgrader course `folder`: nbgrader_config.py, source/<assignment>/
    copied from `src`, and an empty submitted/. Existing files are kept, never overwritten (the
    teacher may have edited them). Returns {"config": written?, "copied": [...], "kept": [...]}."""
    folder = Path(folder)
    found = assignments(src)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nbgrader_config.py"
    wrote_config = not config.exists()
    if wrote_config:
        config.write_text(NBGRADER_CONFIG.format(course_id=course_id, timeout=int(timeout)))
    copied, kept = [], []
    for name, path in found.items():
        dest = folder / "source" / name
        if dest.exists():
            kept.append(name)
            continue
        shutil.copytree(path, dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        for nb in dest.glob("*.ipynb"):
            strip_outputs(nb)
        copied.append(name)
    (folder / "submitted").mkdir(exist_ok=True)
    return {"config": wrote_config, "copied": copied, "kept": kept}


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


REPLY_POLL = 1.0  # seconds: the longest a missed wake-up can delay a cell's reply in `run_notebooks`


def _sliced(get_msg, slice_s: float = REPLY_POLL):
    """`get_msg(timeout=T)` of a kernel client's channel, polled in slices of at most `slice_s` seconds up
    to the same deadline: raises `queue.Empty` only when the whole T has passed with no message."""
    async def get_msg_sliced(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = slice_s if deadline is None else min(slice_s, max(0.0, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
    return get_msg_sliced


class _NotebookClient(NotebookClient):
    """nbclient, waiting for each cell's reply in short polls. nbclient 0.11 polls the shell channel once
    for the whole cell timeout; after cells that send many widget messages (`interact`), that poll now
    and then misses the reply's wake-up and returns only at the deadline, on an idle kernel (seen in
    `make test`'s notebook run: one cell of notebook 04 waited out the 900 s timeout). Polls of
    `REPLY_POLL` seconds see the waiting reply at the next poll."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        kc.shell_channel.get_msg = _sliced(kc.shell_channel.get_msg)
        return kc

    start_new_kernel_client = run_sync(async_start_new_kernel_client)  # the sync twin, as nbclient defines it


def _run_one(path: Path, out_dir: Path, timeout: int) -> dict:
    """Execute one notebook in its folder, stop at the first error, write its HTML rendering."""
    nb = nbformat.read(path, as_version=4)
    current = {"cell": None}

    def on_execute(cell, cell_index):
        current["cell"] = cell_index

    client = _NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_execute=on_execute,
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


NEXT_STEPS = """\
next, in {folder}:
  nbgrader generate_assignment A1_building_blocks    # the student version, in release/A1_building_blocks/
  (hand it out; put each student's notebook in submitted/<student>/A1_building_blocks/, or: nbgrader zip_collect)
  nbgrader autograde A1_building_blocks --create     # run and score every submission (gradebook.db)
  jupyter lab                                        # Nbgrader > Formgrader: grade the written answers
  nbgrader generate_feedback A1_building_blocks      # feedback/<student>/A1_building_blocks/*.html
  nbgrader export                                    # grades.csv"""


def _cmd_init(args) -> int:
    folder = Path(args.folder)
    done = init_course(folder, Path(args.src), args.course_id, args.timeout)
    print(f"{folder / 'nbgrader_config.py'}: {'written' if done['config'] else 'kept as it was'}")
    for name in done["copied"]:
        print(f"source/{name}: copied from {args.src}")
    for name in done["kept"]:
        print(f"source/{name}: kept as it was (delete it and rerun to take {args.src}'s version)")
    print(NEXT_STEPS.format(folder=folder))
    return 0


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
    parser = argparse.ArgumentParser(prog="lgemma course", description="Course tooling: an nbgrader course of the "
                                     "assignments, and running the course notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create an nbgrader course folder holding lgemma's assignments",
                       description="Create (or complete) an nbgrader course: nbgrader_config.py, source/ with "
                                   "lgemma's assignments, submitted/. Existing files are never overwritten.")
    p.add_argument("folder", help="the course folder, e.g. ~/lgemma-course")
    p.add_argument("--src", default=str(ASSIGNMENTS), help="assignment sources (default: notebooks/assignments)")
    p.add_argument("--course-id", default="lgemma", help="nbgrader's course id (default: lgemma)")
    p.add_argument("--timeout", type=int, default=CELL_TIMEOUT,
                   help=f"seconds a cell may run when nbgrader executes a notebook (default {CELL_TIMEOUT})")
    p.set_defaults(fn=_cmd_init)
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
