"""The student edition of a chapter runs top to bottom and raises exactly the NotImplementedErrors of its stubs.

Each chapter's student edition takes up to two minutes; `make test` runs its tests in two processes (pytest-xdist,
a file's tests in one, the files handed out in the order of the Makefile's LONGEST list), so the chapters are
split into GROUPS of a minute or two, one test file each (test_student_edition_1.py to _5.py), which that list
places among the other long files so that the two processes finish together.
"""
import re

from nbclient import NotebookClient

from conftest import ROOT
from flowbook import editions


# Chapters (by number) per test file, grouped by the time their student edition took in `make test` (seconds, on
# the 2-core CPU, quick mode of 20 steps of 16 images): 03 60; 07 114; 05 61 + 08 27; 06 25 + 01 under 21;
# 02 38 + 04 26.
GROUPS = [("03",), ("07",), ("05", "08"), ("06", "01"), ("02", "04")]


def group(k):
    """The chapter sources of test file k (1-based)."""
    return [src for src in editions.chapters() if src.stem[:2] in GROUPS[k - 1]]


def check_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors(source):
    nb = editions.make_edition(source, "student")
    NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    stubs = re.findall(r'NotImplementedError\("(Exercise \d+): ', "\n".join(
        c.source for c in nb.cells if "student" in c.metadata.get("tags", [])))
    assert stubs, "the chapter has no stubs"
    got = [(o["ename"], o["evalue"].split(":")[0]) for _, o in errors]
    unexpected = "\n\n".join(f"cell {i}:\n{nb.cells[i].source}\n" + "\n".join(o.get("traceback", []))[-3000:]
                             for i, o in errors if o["ename"] != "NotImplementedError")
    # one per exercise check: its own stub's, or that of an earlier exercise it builds on (ch3's training loop
    # trains your own coupling layers)
    assert len(got) == len(stubs) and all(e == "NotImplementedError" for e, _ in got), \
        f"expected one NotImplementedError per stub {stubs}, got {got}\n{unexpected}"
    assert all(label == own or int(label.split()[1]) < int(own.split()[1]) for (_, label), own in zip(got, stubs)), got
    for i, _ in errors:
        assert "exercises.check_" in nb.cells[i].source, f"cell {i} failed, which is no exercise check"
        assert "raises-exception" in nb.cells[i].metadata.get("tags", []), "nbval would fail on this cell"
