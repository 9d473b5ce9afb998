"""An nbgrader course from the chapter sources in notebooks/: the lecturer's way to grade the exercises.

    python -m flowbook.grading [--out grading] [--force]        (make nbgrader)

writes, for every chapter, the assignment `<out>/source/<chapter>/<chapter>.ipynb` and the course's
`<out>/nbgrader_config.py`, then checks every notebook the way nbgrader's `generate_assignment` will release
it (no solution, answer or hidden test left in the release). From the single source, each chapter becomes:
- an implementation exercise: its solution cell an autograded answer cell, with the lines the stub leaves out
  between nbgrader's `### BEGIN SOLUTION` / `### END SOLUTION` (the release has nbgrader's stub there); its
  last check cell an autograder test cell, `exercises.grade(...)` with hints off (what a student sees) and
  then, between `### BEGIN HIDDEN TESTS` / `### END HIDDEN TESTS`, with the checker's mistake-specific tests,
  which name the mistake in the feedback. An exercise in parts (a stub and a check each, chapter 3's mask
  and coupling layer) scores each part: the test cell returns the points of the parts that pass;
- a conceptual question: its answer cell a manually graded answer cell (the lecturer's answer in the source,
  "YOUR ANSWER HERE" in the release);
- every other cell read-only (locked); spoiler cells as in the student edition (flowbook.editions).
Points are written once, in the exercise's heading in the chapter source, where students see them:
"### Exercise 1: title (implementation, 2 points, about 10 minutes)"; an exercise in parts gives each part's
points in order: "(implementation, 2 + 3 points, about 40 minutes)".

A course is the lecturer's data: this never touches the gradebook, release/, submitted/, autograded/ or
feedback/. A source notebook or nbgrader_config.py changed since it was written (a cell, or the nbgrader
metadata that the nbgrader toolbar edits) is kept, and the new version goes to `<out>/new/` instead;
`--force` overwrites them.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from flowbook import editions
from flowbook.config import PROJECT_ROOT
from flowbook.editions import _tags

HEADING = re.compile(r"^### Exercise (\d+): (.*) \((implementation|conceptual), (.*)\)\s*$", re.M)
POINTS = re.compile(r"^(\d+(?:\.\d+)?(?: \+ \d+(?:\.\d+)?)*) points?$")
CHECK = re.compile(r"^exercises\.(check_\w+)\((.*)\)$")
EDITION_TAGS = {"student", "solution", "answer", "spoiler", "spoiler-run", "raises-exception"}

CONFIG = '''\
# nbgrader configuration of the flowbook course, written by `make nbgrader` (python -m flowbook.grading).
# Once you change this file, `make nbgrader` keeps it (and writes its new version to new/); FORCE=1 overwrites.
import os

c = get_config()  # noqa: F821 (nbgrader defines get_config)
c.CourseDirectory.course_id = "flowbook"
# Autograding runs the whole chapter, then its tests, in kernels that inherit this environment: in quick mode
# unless FLOWBOOK_MODE is set (on a machine with a GPU, flowbook's default would be full mode).
os.environ.setdefault("FLOWBOOK_MODE", "quick")
# Its slowest cell, chapter 5's timing of each shipped model, took 45 s on a 2-core CPU (docs/teaching.md); a
# cell that runs longer than this many seconds is stopped, and a test cell stopped scores zero.
c.Execute.timeout = 600
'''


class GradingError(ValueError):
    """A chapter source that cannot be made into an nbgrader assignment, or a course that would be damaged."""


@dataclass
class Exercise:
    number: int
    title: str
    kind: str  # "implementation" or "conceptual"
    points: tuple  # one number per part
    minutes: int | None


def parse_heading(line: str, where: str) -> Exercise:
    """The Exercise of a heading "### Exercise N: title (kind, P points, about M minutes)"; a GradingError
    naming `where` if its points are missing."""
    match = HEADING.match(line.strip())
    if not match:
        raise GradingError(f"{where}: cannot read the exercise heading {line.strip()!r}; write it as "
                           "'### Exercise 1: title (implementation, 2 points, about 10 minutes)'")
    number, title, kind, rest = match.groups()
    fields = [f.strip() for f in rest.split(",")]
    points = [POINTS.match(f) for f in fields if POINTS.match(f)]
    if len(points) != 1:
        raise GradingError(f"{where}: Exercise {number} states no points in its heading {line.strip()!r}; add them "
                           f"after its kind, e.g. '({kind}, 2 points, about 10 minutes)', or '2 + 3 points' for an "
                           "exercise in two parts")
    minutes = next((int(m.group(1)) for f in fields if (m := re.match(r"about (\d+) minutes?", f))), None)
    return Exercise(int(number), title, kind, tuple(float(p) for p in points[0].group(1).split(" + ")), minutes)


def exercises_of(source: Path) -> list[Exercise]:
    """The exercises of a chapter source, in order, with their points."""
    nb = editions.read_source(source)
    return [parse_heading(line, source.name) for cell in nb.cells if cell.cell_type == "markdown"
            for line in cell.source.splitlines() if line.startswith("### Exercise")]


def _points(value: float) -> str:
    return f"{value:g}"


def _answer_source(stub: str, solution: str, where: str) -> str:
    """The solution with the lines that the stub leaves out between nbgrader's solution markers, so that
    nbgrader's release is the stub (with nbgrader's own `raise NotImplementedError()` for the stub's)."""
    a, b = stub.splitlines(), solution.splitlines()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        removed = [line for line in a[i1:i2] if line.strip()]
        if op == "equal" or (not removed and not any(line.strip() for line in b[j1:j2])):
            out += b[j1:j2]
            continue
        if len(removed) != 1 or not removed[0].lstrip().startswith("raise NotImplementedError"):
            changed = "\n".join((a[i1:i2] or b[j1:j2])[:3])
            raise GradingError(f"{where}: the stub and the solution differ elsewhere than at the stub's `raise "
                               f"NotImplementedError(...)` line, at:\n{changed}\nnbgrader replaces each solution "
                               "region by one stub line, so write the solution as the stub with only that line "
                               "replaced (a helper function or a decorator goes inside the function)")
        indent = re.match(r"\s*", removed[0]).group(0)
        out += [f"{indent}### BEGIN SOLUTION", *b[j1:j2], f"{indent}### END SOLUTION"]
    return "\n".join(out)


def _nbgrader(cell, grade_id: str, *, grade=False, solution=False, locked=False, points=None):
    cell.metadata["nbgrader"] = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
                                 "solution": solution, "task": False}
    if points is not None:
        cell.metadata["nbgrader"]["points"] = points
    cell.metadata.pop("jupyter", None)  # the solutions are collapsed in notebooks/; a grader reads them
    tags = sorted(_tags(cell) - EDITION_TAGS)
    if tags:
        cell.metadata["tags"] = tags
    else:
        cell.metadata.pop("tags", None)
    return cell


def _grade_call(parts, hints: bool) -> str:
    """exercises.grade(...) of `parts`, one part a line."""
    calls = f",\n{' ' * 16}".join(f"({_points(p)}, exercises.{checker}, {args})" for p, checker, args in parts)
    return f"exercises.grade({calls}{'' if hints else ', hints=False'})"


def _parts(exercise: Exercise, checks: list, where: str) -> list:
    """[(points, checker name, arguments as written)] of an implementation exercise, one per check cell."""
    calls = [CHECK.match(c.source.strip()) for c in checks]
    if not all(calls):
        raise GradingError(f"{where}: a check cell must be one call, exercises.check_name(arguments); got "
                           f"{next(c.source for c, m in zip(checks, calls) if not m)!r}")
    if exercise.kind != "implementation" or len(exercise.points) != len(calls):
        raise GradingError(f"{where}: {len(calls)} check cell(s), but the heading gives points for "
                           f"{len(exercise.points)} part(s) of an {exercise.kind} exercise; give one number "
                           f"per part, e.g. '(implementation, {' + '.join(['2'] * len(calls))} points, ...)'")
    return [(p, m.group(1), m.group(2)) for p, m in zip(exercise.points, calls)]


def course_notebook(source: Path) -> nbformat.NotebookNode:
    """The nbgrader source notebook of one chapter (see the module's docstring)."""
    nb = copy.deepcopy(editions.read_source(source))
    cells = editions.without_spoilers(source, nb.cells)
    # which exercise each cell belongs to: from its heading to the next heading or section ("## References")
    owner, current = [], None
    for cell in cells:
        if cell.cell_type == "markdown":
            heads = [line for line in cell.source.splitlines() if line.startswith("### Exercise")]
            if len(heads) > 1:
                raise GradingError(f"{source.name}: one markdown cell holds {len(heads)} exercise headings; give each "
                                   "exercise its own cell")
            if heads:
                current = parse_heading(heads[0], source.name)
            elif current and cell.source.lstrip().startswith("## "):
                current = None
        owner.append(current)
    checks = {}  # exercise number -> its check cells, in order
    for cell, exercise in zip(cells, owner):
        if exercise and cell.cell_type == "code" and "exercises.check_" in cell.source:
            checks.setdefault(exercise.number, []).append(cell)
    parts_of = {n: _parts(next(e for e in owner if e and e.number == n), cs, f"{source.name}, Exercise {n}")
                for n, cs in checks.items()}  # before any cell changes
    out, stub, part = [], None, {}
    for i, (cell, exercise) in enumerate(zip(cells, owner)):
        tags = _tags(cell)
        where = f"{source.name}, Exercise {exercise.number}" if exercise else source.name
        if ("student" in tags or "solution" in tags or "answer" in tags) and exercise is None:
            raise GradingError(f"{where}, cell {i + 1}: a cell tagged {sorted(tags)} outside any exercise "
                               "(its heading must come first, '### Exercise N: ...')")
        if "student" in tags:
            stub = cell.source
            continue
        n = exercise.number if exercise else 0
        if "solution" in tags:
            if stub is None:
                raise GradingError(f"{where}: a solution cell without a stub cell (tagged student) before it")
            k = part[n] = part.get(n, 0) + 1
            cell.source = _answer_source(stub, cell.source, where)
            out.append(_nbgrader(cell, f"exercise{n}-part{k}-answer", solution=True))
            stub = None
        elif "answer" in tags:
            if exercise.kind != "conceptual" or len(exercise.points) != 1:
                raise GradingError(f"{where}: an answer cell (tagged answer) belongs to a conceptual question with "
                                   "one number of points, '(conceptual, 2 points, about 10 minutes)'")
            out.append(_nbgrader(cell, f"exercise{n}-answer", grade=True, solution=True,
                                 points=exercise.points[0]))
        elif exercise and any(cell is c for c in checks.get(n, [])):
            parts = parts_of[n]
            k = next(j for j, c in enumerate(checks[n]) if c is cell)
            if k < len(parts) - 1:  # an earlier part: the student checks it here, the test cell grades it
                cell.source = (f"# Checks part {k + 1} of Exercise {n}; the test cell at the end of the exercise "
                               f"grades it.\n{_grade_call(parts[k:k + 1], hints=False)}")
                out.append(_nbgrader(cell, f"exercise{n}-part{k + 1}-check", locked=True))
                continue
            total = _points(sum(exercise.points))
            cell.source = "\n".join([
                f"# The autograder's test of Exercise {n} ({total} point{'' if total == '1' else 's'}). Run it to "
                "check your code;",
                "# the grader also runs hidden tests, which name your mistake (if any) in your feedback.",
                _grade_call(parts, hints=False),
                "### BEGIN HIDDEN TESTS",
                _grade_call(parts, hints=True),
                "### END HIDDEN TESTS"])
            out.append(_nbgrader(cell, f"exercise{n}-test", grade=True, locked=True, points=sum(exercise.points)))
        else:
            out.append(_nbgrader(cell, f"cell-{i + 1:03d}", locked=True))
    for exercise in {e.number: e for e in owner if e}.values():
        if exercise.kind == "implementation" and not checks.get(exercise.number):
            raise GradingError(f"{source.name}, Exercise {exercise.number}: an implementation exercise without a "
                               "check cell (exercises.check_name(...)) to grade it")
        if exercise.kind == "conceptual" and not any(c.metadata["nbgrader"]["grade_id"] == f"exercise"
                                                     f"{exercise.number}-answer" for c in out):
            raise GradingError(f"{source.name}, Exercise {exercise.number}: a conceptual question without an answer "
                               "cell (tagged answer) to grade")
    nb.cells = out
    nb.metadata.pop("jupytext", None)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return nb


def released(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook as nbgrader's generate_assignment releases it to students (its steps that need no
    gradebook), after a check of the cells' nbgrader metadata."""
    from nbgrader.preprocessors import CheckCellMetadata, ClearHiddenTests, ClearOutput, ClearSolutions, LockCells

    out = copy.deepcopy(nb)
    for step in (CheckCellMetadata, LockCells, ClearSolutions, ClearOutput, ClearHiddenTests, CheckCellMetadata):
        out, _ = step().preprocess(out, {})
    return out


def check_release(name: str, nb: nbformat.NotebookNode) -> None:
    """A GradingError unless the release of `nb` keeps every cell, and shows no solution, answer or hidden test."""
    release = released(nb)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells]
    if len(set(ids)) != len(ids):
        raise GradingError(f"{name}: duplicate nbgrader cell ids {sorted({i for i in ids if ids.count(i) > 1})}")
    if len(release.cells) != len(nb.cells):
        raise GradingError(f"{name}: the release has {len(release.cells)} cells, the source {len(nb.cells)}")
    for cell, out in zip(nb.cells, release.cells):
        meta, grade_id = cell.metadata["nbgrader"], cell.metadata["nbgrader"]["grade_id"]
        text = out.source
        if any(mark in text for mark in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS")):
            raise GradingError(f"{name}, cell {grade_id}: a marker is left in the release")
        if meta["solution"] and cell.cell_type == "code":
            hidden = re.findall(r"### BEGIN SOLUTION\n(.*?)\n\s*### END SOLUTION", cell.source, flags=re.S)
            leaked = [line for block in hidden for line in block.splitlines() if line.strip() and line in text]
            if leaked:
                raise GradingError(f"{name}, cell {grade_id}: the release shows the solution line {leaked[0]!r}")
            if "NotImplementedError" not in text or not re.search(r"^\s*(def|class) ", text, flags=re.M):
                raise GradingError(f"{name}, cell {grade_id}: the release has no stub (the def or class of the "
                                   "exercise, raising NotImplementedError): mark the solution's lines")
        if meta["solution"] and cell.cell_type == "markdown" and cell.source.strip() in text:
            raise GradingError(f"{name}, cell {grade_id}: the release shows the lecturer's answer")
        if meta["grade"] and cell.cell_type == "code" and "hints=False" not in text:
            raise GradingError(f"{name}, cell {grade_id}: the release has no visible test")


def _write_kept(path: Path, new: Path, write, keep: bool) -> Path:
    """Write with `write(path)`, or to `new` instead when `keep` (the file at `path` was changed since)."""
    target = new if keep else path
    target.parent.mkdir(parents=True, exist_ok=True)
    write(target)
    return target


def write_course(out_dir: Path | None = None, sources=None, force: bool = False) -> list[Path]:
    """Write the course (see the module's docstring) to `out_dir` (default: grading/); return the files
    written. Every chapter is made and checked before anything is written."""
    sources = sources or editions.chapters()
    out_dir = Path(out_dir) if out_dir else PROJECT_ROOT / "grading"
    if out_dir.resolve() in (editions.NOTEBOOKS.resolve(), PROJECT_ROOT.resolve()):
        raise GradingError(f"the course is never written into {out_dir}: give it a folder of its own (grading/)")
    try:
        import nbgrader  # noqa: F401  (the release check needs it)
    except ImportError:
        raise GradingError("nbgrader is not installed: run `make setup` (it installs flowbook[dev]), or "
                           "pip install -e '.[dev]'") from None
    course = [(src, course_notebook(src)) for src in sources]
    for src, nb in course:
        check_release(src.stem, nb)
    written = []
    for src, nb in course:
        nb.metadata["flowbook"] = {"edition": "nbgrader", "fingerprint": editions.fingerprint(nb, "nbgrader")}
        path = out_dir / "source" / src.stem / f"{src.stem}.ipynb"
        keep = path.exists() and not force and editions.edited(path, "nbgrader")
        written.append(_write_kept(path, out_dir / "new" / src.stem / path.name, lambda p, n=nb: nbformat.write(n, p),
                                   keep))
    config = out_dir / "nbgrader_config.py"
    keep = config.exists() and not force and config.read_text() != CONFIG
    written.append(_write_kept(config, out_dir / "new" / config.name, lambda p: p.write_text(CONFIG), keep))
    return written


def summary(sources=None) -> str:
    """One line per chapter: its autograded and manually graded exercises and points."""
    lines = []
    for src in sources or editions.chapters():
        ex = exercises_of(src)
        auto = [e for e in ex if e.kind == "implementation"]
        manual = [e for e in ex if e.kind == "conceptual"]
        lines.append(f"  {src.stem}: {len(auto)} autograded ({_points(sum(sum(e.points) for e in auto))} points), "
                     f"{len(manual)} manually graded ({_points(sum(sum(e.points) for e in manual))} points)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the chapters as an nbgrader course (grading/).")
    parser.add_argument("--out", type=Path, default=None, help="the course folder (default: grading/)")
    parser.add_argument("--force", action="store_true", help="overwrite files the lecturer changed since")
    args = parser.parse_args(argv)
    try:
        written = write_course(args.out, force=args.force)
    except (GradingError, editions.EditionError) as err:
        parser.exit(2, f"flowbook.grading: error: {err}\n")
    root = Path(args.out) if args.out else PROJECT_ROOT / "grading"
    for path in written:
        print(f"wrote {path}")
    print(f"\nEvery notebook checked as nbgrader will release it:\n{summary()}")
    kept = [p for p in written if "new" in p.relative_to(root).parts[:1]]
    if kept:
        print("\nThese files were changed since they were written and were NOT touched; their new versions are in "
              f"{root / 'new'}:")
        for path in kept:
            inside = path.relative_to(root / "new")
            print(f"  {root / inside if inside.name == 'nbgrader_config.py' else root / 'source' / inside}")
        print("Copy what you need from the new versions, or run again with --force (make nbgrader FORCE=1).")
    print(f"\nNext, with flowbook's environment active (docs/teaching.md): cd {root} && nbgrader generate_assignment "
          f"{editions.chapters()[0].stem}, then collect, autograde, generate_feedback")


if __name__ == "__main__":
    main()
