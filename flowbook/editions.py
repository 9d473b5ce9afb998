"""Student and solution editions of the chapters, from the single source in notebooks/.

In each `notebooks/NN_name.py`, an exercise is three cells side by side:
    # %% tags=["student"]     the stub: raises NotImplementedError("Exercise N: ...")
    # %% tags=["solution"]    the solution (defines the same names, so it wins in the source notebook)
    # %% [markdown] tags=["answer"]   for a conceptual question: the answer (instructor only)

    python -m flowbook.editions student     -> student/NN_name.ipynb   (stubs, no solutions, no answers;
                                               the exercise checks are tagged raises-exception)
    python -m flowbook.editions solutions   -> solutions/NN_name.ipynb (solutions, answers, no stubs)
Both also write answers/answer_key.md, the conceptual answers of every chapter, for the instructor.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import jupytext
import nbformat

from flowbook.config import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
DROP = {"student": {"solution", "answer"}, "solutions": {"student"}}


def chapters(folder: Path = NOTEBOOKS) -> list[Path]:
    """The chapter sources notebooks/NN_name.py, in order."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def _tags(cell) -> set:
    return set(cell.get("metadata", {}).get("tags", []))


def make_edition(source: Path, edition: str) -> nbformat.NotebookNode:
    """The `edition` ("student" or "solutions") of one chapter source, as a notebook without outputs."""
    if edition not in DROP:
        raise ValueError(f"edition must be 'student' or 'solutions', got {edition!r}")
    nb = jupytext.read(source)
    out = copy.deepcopy(nb)
    out.cells = [c for c in out.cells if not (_tags(c) & DROP[edition])]
    if edition == "student":  # a check of an unsolved exercise raises: nbval and "Run All" expect it and go on
        for cell in out.cells:
            if cell.cell_type == "code" and "exercises.check_" in cell.source:
                cell.metadata["tags"] = sorted(_tags(cell) | {"raises-exception"})
    out.metadata.pop("jupytext", None)
    out.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return out


def answer_key(sources) -> str:
    """Markdown with every conceptual question (the markdown cell before an answer) and its answer."""
    parts = ["# flowbook: answer key (instructors only)\n"]
    for src in sources:
        cells = jupytext.read(src).cells
        answers = [(cells[i - 1].source if i else "", c.source) for i, c in enumerate(cells) if "answer" in _tags(c)]
        if answers:
            parts.append(f"\n## {src.stem}\n")
            parts += [f"\n{question}\n\n{answer}\n" for question, answer in answers]
    return "".join(parts)


def write_edition(edition: str, out_dir: Path | None = None, sources=None) -> list[Path]:
    """Write the edition of every chapter to `out_dir` (student/ or solutions/) and the answer key to
    answers/; return the notebooks written."""
    sources = sources or chapters()
    out_dir = Path(out_dir) if out_dir else PROJECT_ROOT / edition
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        path = out_dir / f"{src.stem}.ipynb"
        nbformat.write(make_edition(src, edition), path)
        written.append(path)
    key = PROJECT_ROOT / "answers" / "answer_key.md"
    key.parent.mkdir(exist_ok=True)
    key.write_text(answer_key(sources))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the student or solutions edition of the chapters.")
    parser.add_argument("edition", choices=sorted(DROP))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for path in write_edition(args.edition, args.out):
        print(f"wrote {path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path}")
    print("wrote answers/answer_key.md (instructors only: do not hand it out)")


if __name__ == "__main__":
    main()
