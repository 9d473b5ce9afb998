"""The nbgrader course (flowbook.grading, `make nbgrader`): its notebooks, a lecturer's files kept, and chapter 1
graded end to end by the real nbgrader: the solution, the untouched release, and a submission with mistakes."""
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from flowbook import editions, exercises, grading
from flowbook.layers import dequantization

CHAPTERS = editions.chapters()
CH1, CH3 = CHAPTERS[0], CHAPTERS[2]


def _meta(nb):
    return {c.metadata["nbgrader"]["grade_id"]: (c, c.metadata["nbgrader"]) for c in nb.cells}


def test_every_exercise_heading_states_its_points_and_the_course_adds_them_up():
    for src in CHAPTERS:
        found = grading.exercises_of(src)
        assert found and all(sum(e.points) > 0 for e in found), src.name
        grades = [m for _, m in _meta(grading.course_notebook(src)).values() if m["grade"]]
        assert sum(m["points"] for m in grades) == sum(sum(e.points) for e in found), src.name


def test_a_heading_without_points_is_refused_with_the_file_and_the_exercise_named(tmp_path):
    broken = tmp_path / CH1.name
    broken.write_text(CH1.read_text().replace("(implementation, 1 point, about 5 minutes)",
                                              "(implementation, about 5 minutes)"))
    with pytest.raises(grading.GradingError, match=r"01_change_of_variables.py: Exercise 2 states no points"):
        grading.course_notebook(broken)
    two = tmp_path / CH3.name
    two.write_text(CH3.read_text().replace("1 + 4 points", "5 points"))
    with pytest.raises(grading.GradingError, match=r"Exercise 1: 2 check cell\(s\), but the heading gives points f"):
        grading.course_notebook(two)


def test_course_notebook_has_answer_test_and_locked_cells_and_no_spoiler():
    nb = grading.course_notebook(CH3)
    cells = _meta(nb)
    answer, _ = cells["exercise2-part1-answer"]
    assert "### BEGIN SOLUTION" in answer.source and "def forward(self, z, ldj, reverse=False):" in answer.source
    test, meta = cells["exercise1-test"]  # an exercise in two parts: 1 + 4 points, graded in one cell
    assert meta == {**meta, "grade": True, "locked": True, "solution": False, "points": 5.0}
    assert ("(1, exercises.check_checkerboard_mask, checkerboard_mask),\n                (4, exercises.check_affine_"
            "coupling" in test.source)
    visible, hidden = test.source.split("### BEGIN HIDDEN TESTS")
    assert "hints=False" in visible and "hints=False" not in hidden and "### END HIDDEN TESTS" in hidden
    part1, meta1 = cells["exercise1-part1-check"]
    assert meta1["locked"] and not meta1["grade"] and "check_checkerboard_mask" in part1.source
    _, manual = cells["exercise5-answer"]
    assert manual["grade"] and manual["solution"] and manual["points"] == 2
    others = [m for _, m in cells.values() if not m["grade"] and not m["solution"]]
    assert others and all(m["locked"] for m in others)
    source = editions.read_source(CH3)
    spoilers = [c.source for c in source.cells if "spoiler" in c.metadata.get("tags", [])]
    assert spoilers and not any(s in c.source for s in spoilers for c in nb.cells)
    assert not any(c.metadata.get("tags") for c in nb.cells if c.cell_type == "code" and "exercises." in c.source)


def test_the_release_shows_no_solution_answer_or_hidden_test_for_every_chapter():
    for src in CHAPTERS:
        nb = grading.course_notebook(src)
        grading.check_release(src.stem, nb)
        release = "\n".join(c.source for c in grading.released(nb).cells)
        assert "exercises.grade(" in release and "HIDDEN" not in release and "**Answer.**" not in release
        assert release.count("YOUR CODE HERE") == len([c for c in nb.cells if c.metadata["nbgrader"]["solution"]
                                                       and c.cell_type == "code"])


def test_the_release_check_refuses_a_solution_left_unmarked():
    nb = grading.course_notebook(CH1)
    cell, _ = _meta(nb)["exercise2-part1-answer"]
    cell.source = re.sub(r"\s*### (BEGIN|END) SOLUTION", "", cell.source)
    with pytest.raises(grading.GradingError, match="exercise2-part1-answer: the release has no stub"):
        grading.check_release(CH1.stem, nb)


def test_a_solution_that_differs_from_its_stub_outside_the_body_is_refused():
    with pytest.raises(grading.GradingError, match="differ elsewhere"):
        grading._answer_source("def f(x):\n    raise NotImplementedError('Exercise 1')",
                               "def helper():\n    pass\n\ndef f(x):\n    return helper()", "here")


def _mask(h, w, invert=False):
    import torch

    m = ((torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)) % 2).float().view(1, 1, h, w)
    return 1 - m if invert else m


def test_grade_gives_partial_credit_per_part_and_never_raises(capsys):
    class NoMask(__import__("torch").nn.Module):  # the coupling layer without (1 - mask): the kept half changes
        def __init__(self, network, mask, c_in):
            import torch

            super().__init__()
            self.network, self.scaling_factor = network, torch.nn.Parameter(torch.zeros(c_in))
            self.register_buffer("mask", mask)

        def forward(self, z, ldj, reverse=False):
            s, t = self.network(z * self.mask).chunk(2, dim=1)
            e_c = self.scaling_factor.exp().view(1, -1, 1, 1)
            s = __import__("torch").tanh(s / e_c) * e_c
            return ((z + t) * s.exp(), ldj + s.sum(dim=[1, 2, 3])) if not reverse else (z * (-s).exp() - t, ldj)

    score = exercises.grade((1, exercises.check_checkerboard_mask, _mask),
                            (4, exercises.check_affine_coupling, NoMask))
    out = capsys.readouterr()
    assert score == 1 and "1 of 5 points" in out.out and "multiply s and t by (1 - mask)" in out.out
    assert out.err == "", "nbgrader gives no points to a test cell that writes to stderr"


def test_grade_without_hints_still_fails_a_mistake_but_does_not_name_it(capsys):
    import math

    def wrong(ll, d):
        return -ll / d  # no log 2
    assert exercises.grade((1, exercises.check_bits_per_dim, wrong), hints=False) == 0
    assert "divide by log 2" not in capsys.readouterr().out
    assert exercises.grade((1, exercises.check_bits_per_dim, wrong)) == 0
    assert "divide by log 2" in capsys.readouterr().out
    assert exercises.grade((1, exercises.check_bits_per_dim, lambda ll, d: -ll / (d * math.log(2))), hints=False) == 1


def test_grade_runs_a_part_again_with_hints_only_when_it_failed_without_them(capsys):
    calls = []

    def check(fn):
        calls.append(fn)
        if fn is not ok:
            raise exercises.CheckFailed("✗ check: failed")

    def ok():
        pass

    def wrong():
        pass
    assert exercises.grade((2, check, ok), hints=False) == 2 and exercises.grade((2, check, ok)) == 2
    assert calls == [ok], "a part that passed without hints passes with them"
    assert exercises.grade((2, check, wrong), hints=False) == 0 and exercises.grade((2, check, wrong)) == 0
    assert calls == [ok, wrong, wrong]
    assert exercises.grade((2, check, ok)) == 2 and len(calls) == 3  # still remembered: not run again


def test_every_mistake_specific_test_is_followed_by_a_check_that_fails_without_it():
    """What lets grade() skip the hidden run of a part that passed: diagnose() only names a mistake that the
    close() or expect() after it fails anyway."""
    import ast

    for module in sorted((ROOT / "flowbook" / "exercises").glob("ch*.py")):
        tree = ast.parse(module.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            calls = [(n.lineno, n.func.id) for n in ast.walk(fn) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Name) and n.func.id in {"diagnose", "close", "expect"}]
            for line, name in calls:
                if name == "diagnose":
                    assert any(other != "diagnose" and later > line for later, other in calls), \
                        f"{module.name}, line {line}: a diagnose() with no close() or expect() after it"


def test_grade_gives_no_points_for_calling_the_switched_off_flowbook_function(capsys):
    def logit_transform(u, alpha):  # flowbook's own, which the exercise switches off
        return dequantization.logit_transform(u, alpha)

    assert exercises.grade((3, exercises.check_logit_transform, logit_transform)) == 0
    assert "implement this yourself" in capsys.readouterr().out


def test_make_nbgrader_keeps_a_lecturers_edits_and_never_touches_grades(tmp_path):
    course = tmp_path / "grading"
    first = grading.write_course(course, sources=[CH1])
    notebook, config = course / "source" / CH1.stem / f"{CH1.stem}.ipynb", course / "nbgrader_config.py"
    assert first == [notebook, config]
    lecturer = {course / "gradebook.db": "grades", course / "submitted" / "ann" / CH1.stem / "x.ipynb": "work",
                course / "autograded" / "a": "a", course / "feedback" / "f": "f", course / "release" / "r": "r"}
    for path, text in lecturer.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert grading.write_course(course, sources=[CH1]) == first  # unchanged files: written again
    nb = nbformat.read(notebook, 4)
    nb.cells[-1].metadata["nbgrader"]["points"] = 7  # the nbgrader toolbar changes points
    nbformat.write(nb, notebook)
    config.write_text(config.read_text() + "c.Execute.timeout = 900\n")
    again = grading.write_course(course, sources=[CH1])
    assert again == [course / "new" / CH1.stem / notebook.name, course / "new" / "nbgrader_config.py"]
    assert nbformat.read(notebook, 4).cells[-1].metadata["nbgrader"]["points"] == 7 and "900" in config.read_text()
    assert all(path.read_text() == text for path, text in lecturer.items())
    grading.write_course(course, sources=[CH1], force=True)
    assert "900" not in config.read_text() and all(path.read_text() == text for path, text in lecturer.items())
    with pytest.raises(grading.GradingError, match="never written into"):
        grading.write_course(editions.NOTEBOOKS, sources=[CH1])


def test_make_nbgrader_from_the_command_line_names_what_it_checked(tmp_path, capsys):
    grading.main(["--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "checked as nbgrader will release it" in out and all(src.stem in out for src in CHAPTERS)
    assert (tmp_path / "c" / "source" / CHAPTERS[-1].stem / f"{CHAPTERS[-1].stem}.ipynb").exists()


# End to end, with nbgrader itself: chapter 1 (its checkers are quick; every chapter's course notebook is made
# the same way, and `make nbgrader` checks the release of all of them).

MISTAKES = {  # answer cell: code with a mistake that a checker names, and the words of its hint
    "exercise1-part1-answer": ("def log_prob_affine(x, scale, shift):\n"  # the switched-off shortcut
                               "    d = torch.distributions\n"
                               "    one = torch.tensor(1.0, dtype=x.dtype)\n"
                               "    base = d.Normal(0 * one, one)\n"
                               "    return d.TransformedDistribution(base, [d.AffineTransform(shift, scale)])"
                               ".log_prob(x)",
                               "implement this yourself"),
    "exercise2-part1-answer": ("def bits_per_dim(log_likelihood, num_dims):\n"  # a named mistake: no log 2
                               "    return -log_likelihood / num_dims", "divide by log 2"),
}


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A course of chapter 1 with its gradebook, the assignment generated, and an nbgrader API for it."""
    from nbgrader.apps import NbGraderAPI
    from traitlets.config.loader import PyFileConfigLoader

    root = tmp_path / "course"
    grading.write_course(root, sources=[CH1])
    # the grader's kernel imports this flowbook; nbgrader runs `alembic` from the environment's bin folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    config.CourseDirectory.root = str(root)
    api = NbGraderAPI(config=config)
    result = api.generate_assignment(CH1.stem)
    assert result["success"], result.get("error")
    return root, api


def test_nbgrader_grades_the_solution_the_untouched_release_and_named_mistakes(course):
    from nbgrader.api import Gradebook

    root, api = course
    name = CH1.stem
    release = nbformat.read(root / "release" / name / f"{name}.ipynb", 4)
    mistakes = nbformat.read(root / "release" / name / f"{name}.ipynb", 4)
    for cell in mistakes.cells:
        if cell.metadata["nbgrader"]["grade_id"] in MISTAKES:
            cell.source = MISTAKES[cell.metadata["nbgrader"]["grade_id"]][0]
    submissions = {"solution": nbformat.read(root / "source" / name / f"{name}.ipynb", 4), "untouched": release,
                   "mistakes": mistakes}
    seconds = {}
    for student, nb in submissions.items():
        (root / "submitted" / student / name).mkdir(parents=True)
        nbformat.write(nb, root / "submitted" / student / name / f"{name}.ipynb")
        start = time.perf_counter()
        result = api.autograde(name, student)
        seconds[student] = time.perf_counter() - start
        assert result["success"], result.get("error")
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gradebook:
        scores = {s: {g.name: (g.score, g.max_score, g.needs_manual_grade)
                      for g in gradebook.find_submission_notebook(name, name, s).grades} for s in submissions}
    auto = [k for k in scores["solution"] if k.endswith("-test")]
    manual = [k for k in scores["solution"] if not k.endswith("-test")]
    assert auto and manual
    assert all(scores["solution"][k][0] == scores["solution"][k][1] > 0 for k in auto), scores["solution"]
    assert all(scores["solution"][k][2] for k in manual), "a conceptual answer waits for the lecturer"
    assert all(score == 0 for score, _, _ in scores["untouched"].values()), scores["untouched"]
    assert all(scores["mistakes"][k][0] == 0 for k in ("exercise1-test", "exercise2-test")), scores["mistakes"]
    result = api.generate_feedback(name, "mistakes")
    assert result["success"], result.get("error")
    feedback = (root / "feedback" / "mistakes" / name / f"{name}.html").read_text()
    for _, hint in MISTAKES.values():
        assert hint in feedback, f"the feedback lacks the checker's hint {hint!r}"
    assert re.search(r"0(\.0)? of 2 points", feedback)
    print(f"autograde of chapter 1 per submission: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")


# docs/teaching.md repeats what the chapters and checkers say; these keep it from drifting.

TEACHING = (ROOT / "docs" / "teaching.md").read_text()


def test_teaching_guide_lists_each_chapters_learning_objectives_as_the_chapter_does():
    for src in CHAPTERS:
        cell = next(c for c in editions.read_source(src).cells if c.source.startswith("**Learning objectives.**"))
        bullets = cell.source.split("\n", 1)[1].strip()
        assert 3 <= bullets.count("\n- ") + 1 <= 5, f"{src.name}: 3 to 5 learning objectives"
        assert bullets in TEACHING, f"docs/teaching.md lacks {src.stem}'s learning objectives as the chapter has them"


def test_teaching_guide_menu_gives_every_exercise_with_the_points_of_its_heading():
    for src in CHAPTERS:
        for e in grading.exercises_of(src):
            row = (f"| {src.stem[:2]} | {e.number}: {e.title} | {e.kind} | {' + '.join(f'{p:g}' for p in e.points)} "
                   f"| {e.minutes} min |")
            assert row in TEACHING, f"docs/teaching.md's exercise menu lacks {row}"


def test_teaching_guide_lists_the_mistakes_each_checker_names():
    import inspect

    for name in exercises.__all__:
        if name.startswith("check_"):
            catches = inspect.getdoc(getattr(exercises, name)).split("Catches:", 1)[1].strip()
            block = "\n".join("  " + line for line in catches.splitlines())
            assert f"`{name}`:\n{block}" in TEACHING, f"docs/teaching.md lacks the mistakes of {name}"


def test_readme_links_the_teaching_guide_in_the_lecturers_section():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## For lecturers and students", 1)[1].split("\n## ", 1)[0]
    assert "docs/teaching.md" in section and "make nbgrader" in section


def test_nbgrader_extensions_load_under_the_pinned_jupyterlab():
    import subprocess

    jupyter = str(Path(sys.executable).parent / "jupyter")
    lab = subprocess.run([jupyter, "labextension", "list"], capture_output=True, text=True, timeout=120)
    line = next((ln for ln in (lab.stdout + lab.stderr).splitlines() if "@jupyter/nbgrader" in ln), "")
    assert "enabled" in line and "OK" in line, f"nbgrader's JupyterLab extension: {line or 'not installed'}"
    import nbgrader  # its server extension: the formgrader, assignment list and validation, with their handlers
    from nbgrader.server_extensions.formgrader import handlers

    assert nbgrader._jupyter_server_extension_points() == [{"module": "nbgrader"}] and handlers.default_handlers


@pytest.mark.parametrize("preset", [None, "full"])
def test_the_course_config_grades_in_quick_mode_unless_the_lecturer_sets_a_mode(tmp_path, monkeypatch, preset):
    from traitlets.config.loader import PyFileConfigLoader

    monkeypatch.setenv("FLOWBOOK_MODE", preset or "unset below")  # so that the test's end restores the variable
    if preset is None:
        monkeypatch.delenv("FLOWBOOK_MODE")
    (tmp_path / "nbgrader_config.py").write_text(grading.CONFIG)
    config = PyFileConfigLoader("nbgrader_config.py", path=str(tmp_path)).load_config()
    assert config.Execute.timeout == 600 and config.CourseDirectory.course_id == "flowbook"
    assert os.environ["FLOWBOOK_MODE"] == (preset or "quick"), "the kernels nbgrader starts inherit this mode"
