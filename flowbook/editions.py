"""Student and solution editions of the chapters, from the single source in notebooks/.

In each `notebooks/NN_name.py`, an exercise is three cells side by side:
    # %% tags=["student"]     the stub: raises NotImplementedError("Exercise N: ...")
    # %% tags=["solution"]    the solution (defines the same names, so it wins in the source notebook)
    # %% [markdown] tags=["answer"]   for a conceptual question: the answer (instructor only)
A cell tagged "spoiler" shows flowbook code that a later exercise asks students to write (say, the source of
CouplingLayer.forward); the student edition replaces it by a note, so no solution appears before its exercise.
A code cell tagged "spoiler-run" computes something later cells need, with code that gives an exercise away
(chapter 2's importance-weighted bound): the student edition still runs it, but shows only a call that runs
it from the chapter source (`run_hidden`), under the same note.

    python -m flowbook.editions student     -> student/NN_name.ipynb   (stubs, no solutions, no answers;
                                               the exercise checks are tagged raises-exception)
    python -m flowbook.editions solutions   -> solutions/NN_name.ipynb (solutions, answers, no stubs)
Both also write answers/answer_key.md for the instructor (with --out DIR: DIR/../answers/answer_key.md):
every exercise, with the answer of each conceptual one, and for each implementation exercise where its
solution is and the mistakes its checker recognises.

A student's work is never overwritten: each notebook written records a fingerprint of its cells, and a
notebook whose cells no longer match it (the student edited it) is left alone; the new version is written
beside it as NN_name.new.ipynb, and the files left alone are listed. `--force` overwrites them. Under each
conceptual question the student edition has an empty answer cell to write in.
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import inspect
import json
from pathlib import Path

import jupytext
import nbformat

from flowbook.config import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
DROP = {"student": {"solution", "answer"}, "solutions": {"student"}}
KNOWN_TAGS = {"student", "solution", "answer", "raises-exception", "skip-execution", "your-answer", "spoiler",
              "spoiler-run"}
ANSWER_HERE = "**Your answer.** (double-click to write it here)"
SPOILER_NOTE = ("*Here the lecturer's edition prints flowbook's own code for this step. You write it yourself in an "
                "exercise at the end of the chapter, so it is left out of your edition.*")


def _hidden_call(source: Path, index: int) -> str:
    note = SPOILER_NOTE.strip("*").replace("prints flowbook's own code", "shows the code")
    return (f"# {note}\n# It still runs here, so that the cells below have what they need.\n"
            f"from flowbook.editions import run_hidden\n\nrun_hidden({source.stem!r}, {index}, globals())")


def run_hidden(chapter: str, index: int, namespace: dict) -> None:
    """Run the `index`-th cell tagged "spoiler-run" of notebooks/<chapter>.py in `namespace` (the student
    edition's stand-in for a cell whose code gives an exercise away)."""
    cells = [c for c in jupytext.read(NOTEBOOKS / f"{chapter}.py").cells if "spoiler-run" in _tags(c)]
    exec(compile(cells[index].source, f"<{chapter}, hidden cell {index}>", "exec"), namespace)


class EditionError(ValueError):
    """A chapter source that cannot be made into an edition, or an edition that would overwrite work."""


def chapters(folder: Path = NOTEBOOKS) -> list[Path]:
    """The chapter sources notebooks/NN_name.py, in order."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def _tags(cell) -> set:
    return set(cell.get("metadata", {}).get("tags", []))


def check_source(source: Path, nb: nbformat.NotebookNode) -> None:
    """An EditionError naming the file and cell for a code cell that does not parse or an unknown tag."""
    for i, cell in enumerate(nb.cells, start=1):
        unknown = _tags(cell) - KNOWN_TAGS
        if unknown:
            raise EditionError(f"{source.name}, cell {i}: unknown tag {sorted(unknown)[0]!r}; "
                               f"the tags are {sorted(KNOWN_TAGS)}")
        if cell.cell_type == "code":
            code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            try:
                ast.parse(code)
            except SyntaxError as err:
                raise EditionError(f"{source.name}, cell {i}, line {err.lineno}: syntax error: {err.msg}") from None


def _with_answer_cells(cells: list) -> list:
    """`cells` with an empty markdown cell for the student's answer after each conceptual question (the
    markdown cell before a dropped answer)."""
    out = []
    for i, cell in enumerate(cells):
        out.append(cell)
        following = cells[i + 1] if i + 1 < len(cells) else None
        if following is not None and "answer" in _tags(following) and cell.cell_type == "markdown":
            out.append(nbformat.v4.new_markdown_cell(ANSWER_HERE, metadata={"tags": ["your-answer"]}))
    return out


def read_source(source: Path) -> nbformat.NotebookNode:
    """A chapter source as a notebook, checked (an EditionError names the file and cell of a problem)."""
    try:
        nb = jupytext.read(source)
    except Exception as err:
        raise EditionError(f"{source.name}: not a readable chapter source ({type(err).__name__}: {err})") from None
    check_source(source, nb)
    return nb


def without_spoilers(source: Path, cells: list) -> list:
    """`cells` of the chapter `source` as a student sees them: a "spoiler" cell becomes SPOILER_NOTE, a
    "spoiler-run" cell a call that runs it from the chapter source (the cells are changed in place)."""
    cells = [nbformat.v4.new_markdown_cell(SPOILER_NOTE) if "spoiler" in _tags(c) else c for c in cells]
    hidden = 0
    for cell in cells:
        if "spoiler-run" in _tags(cell):
            cell.source, hidden = _hidden_call(source, hidden), hidden + 1
    return cells


def make_edition(source: Path, edition: str) -> nbformat.NotebookNode:
    """The `edition` ("student" or "solutions") of one chapter source, as a notebook without outputs."""
    if edition not in DROP:
        raise ValueError(f"edition must be 'student' or 'solutions', got {edition!r}")
    out = copy.deepcopy(read_source(source))
    if edition == "student":
        out.cells = _with_answer_cells(out.cells)
    out.cells = [c for c in out.cells if not (_tags(c) & DROP[edition])]
    if edition == "student":
        out.cells = without_spoilers(source, out.cells)
        # a check of an unsolved exercise raises: nbval and "Run All" expect it and go on
        for cell in out.cells:
            if cell.cell_type == "code" and "exercises.check_" in cell.source:
                cell.metadata["tags"] = sorted(_tags(cell) | {"raises-exception"})
    out.metadata.pop("jupytext", None)
    out.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return out


def _exercise_text(cells: list, i: int) -> str:
    """The text of the exercise that cells[i] belongs to: its "### Exercise" heading's markdown cell, and the
    markdown cells between it and cells[i] (an exercise in steps has one per step)."""
    start = next((j for j in range(i - 1, -1, -1) if cells[j].cell_type == "markdown"
                  and "### Exercise" in cells[j].source), None)
    if start is None:
        return ""
    text = cells[start].source[cells[start].source.find("### Exercise"):]
    steps = [c.source for c in cells[start + 1:i] if c.cell_type == "markdown" and "answer" not in _tags(c)]
    return "\n\n".join([text, *steps])


def _implementation_entry(src: Path, cells: list, i: int) -> str:
    """The answer key's text for the implementation exercise whose stub is cells[i]: where the solution is,
    and what the checker called after it recognises."""
    from flowbook import exercises

    check = next((c.source for c in cells[i + 1:] if "exercises.check_" in c.source), "")
    name = check.split("exercises.")[1].split("(")[0] if check else None
    text = f"**Solution.** `solutions/{src.stem}.ipynb`, the cell after the exercise (hidden in `notebooks/`)."
    if name:
        doc = inspect.getdoc(getattr(exercises, name)) or ""
        catches = doc.split("Catches:", 1)[1].strip() if "Catches:" in doc else ""
        text += f" Checked by `exercises.{name}`, which recognises these mistakes and names each:\n\n{catches}"
    return text


def answer_key(sources) -> str:
    """Markdown with every exercise (the markdown cell before its stub or answer): the answer of each
    conceptual question; for each implementation exercise, where its solution is and what its checker catches."""
    parts = ["# flowbook: answer key (instructors only)\n"]
    for src in sources:
        cells = jupytext.read(src).cells
        entries = []
        for i, cell in enumerate(cells):
            if "answer" in _tags(cell):
                entries.append(f"\n{_exercise_text(cells, i)}\n\n{cell.source}\n")
            elif "student" in _tags(cell):
                entries.append(f"\n{_exercise_text(cells, i)}\n\n{_implementation_entry(src, cells, i)}\n")
        if entries:
            parts.append(f"\n## {src.stem}\n")
            parts += entries
    return "".join(parts)


def fingerprint(nb: nbformat.NotebookNode, metadata: str | None = None) -> str:
    """sha256 of a notebook's cell types and sources (not outputs or metadata: running or saving a
    notebook in JupyterLab does not change it, editing a cell does), and of each cell's `metadata` entry if
    given (an nbgrader course's points and cell kinds, which a lecturer can change in nbgrader's toolbar)."""
    cells = [[c.cell_type, c.source] + ([c.metadata.get(metadata)] if metadata else []) for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()


def edited(path: Path, metadata: str | None = None) -> bool:
    """Whether the notebook at `path` was changed since flowbook wrote it (or was not written by flowbook):
    its fingerprint (with `metadata`, see `fingerprint`) no longer matches the one stored when it was written."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:
        return True
    return nb.metadata.get("flowbook", {}).get("fingerprint") != fingerprint(nb, metadata)


def answer_key_path(out_dir: Path) -> Path:
    """Where the answer key goes for an edition written to `out_dir`: answers/ beside it, never inside it."""
    return Path(out_dir).resolve().parent / "answers" / "answer_key.md"


def write_edition(edition: str, out_dir: Path | None = None, sources=None, force: bool = False) -> list[Path]:
    """Write the edition of every chapter to `out_dir` (default student/ or solutions/) and the answer key
    to answers/answer_key.md beside it (in out_dir's parent folder, never inside out_dir, which is handed
    out); return the notebooks written. A notebook there that was edited since it was written is
    kept, and the new version goes beside it as NN_name.new.ipynb (`force`: overwrite it)."""
    sources = sources or chapters()
    out_dir = Path(out_dir) if out_dir else PROJECT_ROOT / edition
    if out_dir.resolve() == NOTEBOOKS.resolve():
        raise EditionError(f"editions are never written into {NOTEBOOKS}: that folder holds the chapter sources")
    editions = [(src, make_edition(src, edition)) for src in sources]  # every source checked before writing
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src, nb in editions:
        nb.metadata["flowbook"] = {"edition": edition, "fingerprint": fingerprint(nb)}
        path = out_dir / f"{src.stem}.ipynb"
        if path.exists() and not force and edited(path):
            path = out_dir / f"{src.stem}.new.ipynb"
        nbformat.write(nb, path)
        written.append(path)
    key = answer_key_path(out_dir)
    key.parent.mkdir(exist_ok=True)
    key.write_text(answer_key(sources))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the student or solutions edition of the chapters.")
    parser.add_argument("edition", choices=sorted(DROP))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="overwrite notebooks that were edited since")
    args = parser.parse_args(argv)
    try:
        written = write_edition(args.edition, args.out, force=args.force)
    except EditionError as err:
        parser.exit(2, f"flowbook.editions: error: {err}\n")

    def show(path):
        return path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path

    for path in written:
        print(f"wrote {show(path)}")
    kept = [p for p in written if p.name.endswith(".new.ipynb")]
    if kept:
        print("\nThese notebooks were changed since they were written and were NOT touched:")
        for path in kept:
            print(f"  {show(path.with_name(path.name.replace('.new.ipynb', '.ipynb')))}  (new version: {path.name})")
        print("Copy what you need from the new versions, or run again with --force to overwrite.")
    print(f"wrote {show(answer_key_path(args.out or PROJECT_ROOT / args.edition))} (instructors only: do not hand "
          "it out)")


if __name__ == "__main__":
    main()
