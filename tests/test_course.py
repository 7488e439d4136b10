"""The course's assignments, graded by nbgrader itself.

`lgemma course init` makes a temporary nbgrader course; then, for every assignment, nbgrader's own
command line runs `validate` on the source, `generate_assignment`, and `autograde` on two
submissions: the reference solution and the released student version, untouched. Scores are read
from nbgrader's gradebook: the solutions get every automatic point (and every point once a grader
gives the written answers theirs, as the formgrader does), the student versions 0, and the grader
gets through every notebook. `generate_feedback` and `export` finish the teacher's loop.

Each assignment runs three times (validate, two submissions); A2 and A3 train their small stage 0
and variant on the first run only (they keep them in lgemma's cache). The small `lgemma course run`
/ `strip` tests at the end take seconds."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from lgemma import course

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENTS = sorted(course.assignments(ROOT / "notebooks" / "assignments"))
STUDENTS = ("reference", "blank")  # the solution as written by the teacher; the release as handed out


def nbgrader(folder: Path, *args: str, timeout: int = 900) -> str:
    """Run nbgrader's command line in the course folder (as course staff do); return its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("LGEMMA_FAST", "LGEMMA_HOME")}
    # as with an activated .venv (the README's first line for teachers): nbgrader runs `alembic` by name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=folder, env=env, timeout=timeout,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nbgrader {' '.join(args)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A course folder after the whole teacher's loop; {assignment: {student: submission summary}}."""
    from nbgrader.api import Gradebook
    folder = tmp_path_factory.mktemp("course")
    assert course.main(["init", str(folder)]) == 0
    seconds = {}
    sources = [str(Path("source") / a / f"{a}.ipynb") for a in ASSIGNMENTS]
    validated = nbgrader(folder, "validate", *sources)
    for a in ASSIGNMENTS:
        nbgrader(folder, "generate_assignment", a, "--force")
        for student, kind in zip(STUDENTS, ("source", "release")):
            dest = folder / "submitted" / student / a
            dest.mkdir(parents=True)
            shutil.copy(folder / kind / a / f"{a}.ipynb", dest)
        t0 = time.perf_counter()
        nbgrader(folder, "autograde", a, "--create", "--force")
        seconds[a] = round(time.perf_counter() - t0, 1)
    scores = {}
    with Gradebook(f"sqlite:///{folder / 'gradebook.db'}") as gb:
        for a in ASSIGNMENTS:
            scores[a] = {}
            for student in STUDENTS:
                sub = gb.find_submission(a, student)
                grades = [g for nb in sub.notebooks for g in nb.grades]
                scores[a][student] = {
                    "auto": sum(g.auto_score or 0 for g in grades),
                    "auto_max": sum(g.max_score for g in grades if g.cell.cell_type == "code"),
                    "manual_pending": [g.name for g in grades if g.needs_manual_grade],
                    "max": sub.max_score, "errors": [g.name for g in grades if g.auto_score is None
                                                     and g.cell.cell_type == "code"]}
            for g in (g for nb in gb.find_submission(a, "reference").notebooks for g in nb.grades):
                if g.needs_manual_grade:  # the teacher reads the written answer and gives it its points
                    g.manual_score = g.max_score
            gb.db.commit()
            scores[a]["reference"]["total"] = gb.find_submission(a, "reference").score
    print("autograde wall times (2 submissions each):", seconds)
    return {"folder": folder, "scores": scores, "validated": validated, "seconds": seconds}


def test_assignments_are_nbgrader_sources():
    """Every cell carries nbgrader's metadata; >= 3 auto-graded parts per assignment, some tests
    hidden from students, and at least one written answer graded by hand in the course."""
    assert [a[:2] for a in ASSIGNMENTS] == ["A1", "A2", "A3", "A4"], ASSIGNMENTS
    manual = 0
    for a in ASSIGNMENTS:
        nb = nbformat.read(ROOT / "notebooks" / "assignments" / a / f"{a}.ipynb", as_version=4)
        meta = [c.metadata.get("nbgrader") for c in nb.cells]
        assert all(m and m.get("schema_version") == 3 and m.get("grade_id") for m in meta), f"{a}: a cell lacks nbgrader metadata"
        assert len({m["grade_id"] for m in meta}) == len(meta), f"{a}: grade ids repeat"
        graded_code = [c for c in nb.cells if c.cell_type == "code" and c.metadata.nbgrader["grade"]]
        assert len(graded_code) >= 3 and all(c.metadata.nbgrader["points"] > 0 for c in graded_code), a
        assert all(c.metadata.nbgrader["locked"] for c in graded_code), f"{a}: test cells must be locked"
        assert any("### BEGIN HIDDEN TESTS" in c.source for c in graded_code), f"{a}: no hidden tests"
        solutions = [c for c in nb.cells if c.cell_type == "code" and c.metadata.nbgrader["solution"]]
        assert solutions and all("### BEGIN SOLUTION" in c.source for c in solutions), a
        manual += sum(c.cell_type == "markdown" and c.metadata.nbgrader["grade"] for c in nb.cells)
    assert manual >= 1


def test_sources_validate(graded):
    """`nbgrader validate` on each source notebook: every test cell passes with the solutions."""
    out = graded["validated"]
    assert out.count("Success! Your notebook passes all the tests.") == len(ASSIGNMENTS), out[-3000:]


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_reference_solution_scores_full_points(graded, assignment):
    s = graded["scores"][assignment]["reference"]
    assert not s["errors"], f"{assignment}: the grader could not score {s['errors']}"
    assert s["auto"] == s["auto_max"] > 0, s
    assert s["total"] == s["max"], s  # with the hand-graded points the formgrader would give


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_released_version_scores_zero(graded, assignment):
    s = graded["scores"][assignment]["blank"]
    assert not s["errors"], f"{assignment}: the grader could not score {s['errors']}"
    assert s["auto"] == 0 and s["manual_pending"] == [], s  # an untouched written answer scores 0 by itself
    release = graded["folder"] / "release" / assignment / f"{assignment}.ipynb"
    text = release.read_text()
    assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
    assert "raise NotImplementedError()" in text


def test_feedback_and_export(graded):
    """The rest of the teacher's loop: feedback files for the students, grades as CSV."""
    folder, a = graded["folder"], ASSIGNMENTS[-1]
    nbgrader(folder, "generate_feedback", a, "--force")
    html = (folder / "feedback" / "reference" / a / f"{a}.html").read_text()
    assert "Score" in html
    nbgrader(folder, "export")
    rows = (folder / "grades.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ASSIGNMENTS) * len(STUDENTS), rows[:3]


def test_init_keeps_what_is_there(tmp_path):
    src = tmp_path / "src" / "hw1"
    src.mkdir(parents=True)
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1", execution_count=1,
                                                     outputs=[new_output("execute_result", {"text/plain": "1"})])]),
                   src / "hw1.ipynb")
    done = course.init_course(tmp_path / "c", tmp_path / "src", course_id="demo", timeout=60)
    assert done == {"config": True, "copied": ["hw1"], "kept": []}
    config = (tmp_path / "c" / "nbgrader_config.py").read_text()
    assert "course_id = 'demo'" in config and "timeout = 60" in config
    assert not course.has_outputs(tmp_path / "c" / "source" / "hw1" / "hw1.ipynb")  # handed out clean
    (tmp_path / "c" / "source" / "hw1" / "hw1.ipynb").write_text("edited by the teacher")
    assert course.init_course(tmp_path / "c", tmp_path / "src") == {"config": False, "copied": [], "kept": ["hw1"]}
    assert (tmp_path / "c" / "source" / "hw1" / "hw1.ipynb").read_text() == "edited by the teacher"
    with pytest.raises(FileNotFoundError, match="no assignment folders"):
        course.init_course(tmp_path / "d", tmp_path / "c" / "submitted")


# ---------------------------------------------------------------- running the course notebooks
def write(path, *cells):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=list(cells)), path)
    return path


def test_run_notebooks_env_html_and_failures(tmp_path, monkeypatch):
    monkeypatch.delenv("LGEMMA_FAST", raising=False)
    folder = tmp_path / "course"
    ok = write(folder / "01_ok.ipynb", new_code_cell("import os, pathlib"),
               new_code_cell(f'assert os.environ["LGEMMA_FAST"] == "1"\n'
                             f'assert pathlib.Path.cwd() == pathlib.Path(r"{folder.resolve()}")\n'
                             'print("hello from 01")'))
    bad = write(folder / "02_bad.ipynb", new_markdown_cell("# boom"), new_code_cell("x = 1"),
                new_code_cell("1 / 0"), new_code_cell("print('never')"))
    out = tmp_path / "out"
    results = course.run_notebooks([ok, bad], out, timeout=60, env={"LGEMMA_FAST": "1"})

    assert [r["name"] for r in results] == ["01_ok", "02_bad"]
    assert results[0]["ok"] and results[0]["error"] is None and results[0]["seconds"] > 0
    assert not results[1]["ok"] and results[1]["cell"] == 2
    assert results[1]["error"] == "02_bad.ipynb, cell 2: ZeroDivisionError: division by zero"
    assert "hello from 01" in (out / "01_ok.html").read_text()
    assert (out / "02_bad.html").exists()
    assert json.loads((out / "times.json").read_text()) == results
    assert "LGEMMA_FAST" not in os.environ


def test_strip_outputs(tmp_path):
    nb = write(tmp_path / "hw.ipynb", new_markdown_cell("# HW"),
               new_code_cell("x = 1", execution_count=1, outputs=[new_output("stream", name="stdout", text="hi\n")]))
    assert course.has_outputs(nb)
    assert course.main(["strip", "--check", str(nb)]) == 1
    assert course.strip_outputs(nb) is True
    assert not course.has_outputs(nb)
    assert course.strip_outputs(nb) is False
    assert course.main(["strip", "--check", str(nb)]) == 0
    assert nbformat.read(nb, as_version=4).cells[1].source == "x = 1"


def test_reply_wait_polls_in_slices_up_to_the_same_deadline():
    """A missed wake-up costs one slice, not the cell's whole timeout (course._NotebookClient); an
    empty channel still raises queue.Empty at the deadline, so real timeouts stay timeouts."""
    import asyncio
    import queue

    calls = []

    async def reply_on_third_poll(timeout=None):  # a reply whose first two polls missed it
        calls.append(timeout)
        if len(calls) < 3:
            raise queue.Empty
        return {"msg_type": "execute_reply"}

    get = course._sliced(reply_on_third_poll, slice_s=0.01)
    assert asyncio.run(get(timeout=900))["msg_type"] == "execute_reply"
    assert len(calls) == 3 and all(t <= 0.01 for t in calls)

    async def never(timeout=None):
        await asyncio.sleep(timeout)
        raise queue.Empty

    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        asyncio.run(course._sliced(never, slice_s=0.02)(timeout=0.1))
    assert 0.1 <= time.monotonic() - t0 < 1.0


def test_notebook_runner_uses_the_sliced_reply_wait(tmp_path):
    nb = new_notebook(cells=[new_code_cell("import ipywidgets as w\nw.interact(lambda k=1: print(k), k=(0, 3))"),
                             new_code_cell("print('done')")])
    path = tmp_path / "w.ipynb"
    nbformat.write(nb, path)
    [result] = course.run_notebooks([path], tmp_path / "out", timeout=60)
    assert result["ok"], result["error"]
    client = course._NotebookClient(nb, kernel_name="python3")
    with client.setup_kernel():
        assert client.kc.shell_channel.get_msg.__name__ == "get_msg_sliced"
