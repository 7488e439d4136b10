"""lgemma.course on small notebooks built in tmp_path. Four notebooks are executed (~2 s of
kernel start-up each); everything else only reads and writes notebooks."""
import json
import os

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from lgemma import course

SOLUTION = """def add(a, b):
    \"\"\"Add two numbers.\"\"\"
    ### BEGIN SOLUTION
    total = a + b
    return total
    ### END SOLUTION
"""
TEST = "### AUTOGRADER\nassert add(2, 3) == 5"
ANSWER = "Why?\n<!-- BEGIN SOLUTION -->\nBecause the secret answer.\n<!-- END SOLUTION -->\nDone."


def write(path, *cells):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=list(cells)), path)
    return path


@pytest.fixture
def assignment(tmp_path):
    """A solution notebook with outputs: intro, solution cell, markdown answer, autograder cell."""
    solved = new_code_cell(SOLUTION, execution_count=1, outputs=[new_output("stream", name="stdout", text="hi\n")])
    return write(tmp_path / "src" / "hw1.ipynb", new_markdown_cell("# HW 1"), solved,
                 new_markdown_cell(ANSWER), new_code_cell(TEST))


def test_release_replaces_solutions(assignment, tmp_path):
    info = course.release_notebook(assignment, tmp_path / "student" / "hw1.ipynb")
    assert info["solutions"] == 2 and info["autograder"] == 1
    nb = nbformat.read(tmp_path / "student" / "hw1.ipynb", as_version=4)
    code, md, test = nb.cells[1], nb.cells[2], nb.cells[3]
    assert "a + b" not in code.source and "SOLUTION" not in code.source
    assert code.source.splitlines()[-1] == '    raise NotImplementedError("exercise: write your solution here")'
    assert code.source.startswith('def add(a, b):\n    """Add two numbers."""\n')
    assert md.source == "Why?\n*(your answer here)*\nDone."
    assert test.source == TEST
    assert not course.has_outputs(tmp_path / "student" / "hw1.ipynb")
    assert code.execution_count is None and code.outputs == []


def test_release_folder_and_cli(assignment, tmp_path, capsys):
    assert course.main(["release", "--src", str(assignment.parent), "--dst", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "hw1.ipynb").exists()
    assert "hw1.ipynb" in capsys.readouterr().out
    with pytest.raises(ValueError, match="overwrite"):
        course.release_notebook(assignment, assignment)


@pytest.mark.parametrize("source, problem", [
    ("x = 1\n### BEGIN SOLUTION\nx = 2", "never closed"),
    ("### END SOLUTION\nx = 2", "without"),
    ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\nx\n### END SOLUTION\n### END SOLUTION", "nested"),
])
def test_unbalanced_code_markers(tmp_path, source, problem):
    nb = write(tmp_path / "bad.ipynb", new_markdown_cell("hi"), new_code_cell(source))
    with pytest.raises(ValueError, match=rf"bad\.ipynb, cell 1.*{problem}"):
        course.release_notebook(nb, tmp_path / "out.ipynb")


def test_unbalanced_markdown_markers(tmp_path):
    nb = write(tmp_path / "bad.ipynb", new_code_cell("x = 1"), new_code_cell("y = 2"),
               new_markdown_cell("<!-- BEGIN SOLUTION -->\nsecret"))
    with pytest.raises(ValueError, match=r"bad\.ipynb, cell 2: .*never closed"):
        course.release_notebook(nb, tmp_path / "out.ipynb")


def test_grade_solution_and_student_version(assignment, tmp_path):
    solved = course.grade_notebook(assignment, timeout=60)
    assert (solved["score"], solved["passed"], solved["total"]) == (1.0, 1, 1)
    assert solved["cells"] == [{"cell": 3, "passed": True, "error": None}]

    student = course.release_notebook(assignment, tmp_path / "student" / "hw1.ipynb")["dst"]
    graded = course.grade_notebook(student, timeout=60)
    assert (graded["score"], graded["passed"], graded["total"]) == (0.0, 0, 1)
    assert graded["cells"][0]["error"].startswith("NotImplementedError: exercise")
    assert graded["error"] is None


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


def test_strip_outputs(assignment, capsys):
    assert course.has_outputs(assignment)
    assert course.main(["strip", "--check", str(assignment)]) == 1
    assert course.strip_outputs(assignment) is True
    assert not course.has_outputs(assignment)
    assert course.strip_outputs(assignment) is False
    assert course.main(["strip", "--check", str(assignment)]) == 0
    assert nbformat.read(assignment, as_version=4).cells[1].source == SOLUTION
