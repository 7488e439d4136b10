"""The course notebooks: each numbered notebook runs top to bottom in fast mode (all of them
share one LGEMMA_HOME, so the fast variants train once) and nothing is committed with outputs.
The assignments are graded by nbgrader itself in tests/test_course.py.

Running the course takes a few minutes on 2 CPU cores (data, stage 0 and two variants in fast
mode, then every notebook in its own kernel)."""
import re
from pathlib import Path

import nbformat
import pytest

from lgemma import course

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ASSIGNMENTS = sorted((ROOT / "notebooks" / "assignments").glob("*/*.ipynb"))  # nbgrader: <assignment>/<notebook>
ALL = sorted((ROOT / "notebooks").glob("**/*.ipynb"))


@pytest.fixture(scope="module")
def course_run(tmp_path_factory):
    home, out = tmp_path_factory.mktemp("lgemma-home"), tmp_path_factory.mktemp("course")
    results = course.run_notebooks(NOTEBOOKS, out, env={"LGEMMA_FAST": "1", "LGEMMA_HOME": str(home)})
    return {r["name"]: r for r in results}, out


def test_the_course_is_there():
    assert [p.name[:2] for p in NOTEBOOKS][:3] == ["00", "01", "02"]
    assert ASSIGNMENTS, "no assignment notebooks in notebooks/assignments"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(course_run, path):
    results, out = course_run
    r = results[path.stem]
    print(f"{path.name}: {r['seconds']} s")
    assert r["ok"], r["error"]
    # widget callbacks run inside the widget's own output area: their errors do not stop the
    # notebook, but they are in the saved widget state
    html = (out / f"{path.stem}.html").read_text(encoding="utf-8")
    assert not re.search(r'"output_type":\s*"error"', html), f"{path.name}: a widget callback raised"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    first_code = next(c.source for c in nb.cells if c.cell_type == "code")
    # "load if cached, else train": one variant (train_variant + load_variant), a grid (run_grid), or the
    # grid's results (load_results: the local grid, else the committed reference, else a reduced grid trained)
    cached = (("load_results(", "run_grid(") if "load_results(" in first_code else ("run_grid(",) if "run_grid(" in first_code
              else ("train_variant(cfg)", "load_variant"))
    for needle in ("LGEMMA_HOME", "torch.manual_seed", *cached):
        assert needle in first_code, f"{path.name}: the set-up cell lacks {needle}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for needle in ("What you will learn", "Expected run time", "## Exercises", "## Conclusion",
                   "## References", "arXiv 2404.01331", "widgets.interactive", "plt."):
        assert needle in text, f"{path.name}: missing {needle!r}"


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_no_stored_outputs(path):
    assert not course.has_outputs(path), f"run `lgemma course strip {path.relative_to(ROOT)}` before committing"
