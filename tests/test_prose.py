"""The chapters' prose against their numbers (issue 19): a bpd computed on a slice of the test set is never set
beside the reference tutorial's whole-test-set results without being labelled as a slice.

A *unit* is one markdown cell of a chapter's source, or one output of a code cell in its stored notebook (the
printed text, a rendered Markdown sentence, an HTML table). A unit that shows one of the reference's test bpd
(1.107, 1.066, 1.026) compares with the reference. Every other bpd-like number in it (three decimals, between
0.9 and 1.6) must then be a whole-test-set result of a shipped checkpoint (its results JSON's `test_bpd` or
`val_bpd`, both on all 10,000 images), or a reference number, unless the unit labels its numbers as a slice
(the word "slice"). The stored outputs are checked as they are committed: regenerate them
(`python -m flowbook.outputs <chapter>`) after changing a chapter.
"""
import json
import re

import nbformat
import pytest

from conftest import ROOT
from flowbook.results import REFERENCE_TEST_BPD

CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
REFERENCE = {f"{v:.3f}" for v in REFERENCE_TEST_BPD.values()}
BPD_LIKE = re.compile(r"(?<![\d.])(0\.9\d\d|1\.[0-5]\d\d)(?![\d])")


def whole_test_set_numbers() -> set:
    """The shipped checkpoints' whole-test-set results (test and validation bpd), as printed with 3 decimals."""
    numbers = set()
    for path in (ROOT / "checkpoints").glob("*.json"):
        res = json.loads(path.read_text())
        if res.get("eval_images", {}).get("test") == 10_000:
            numbers |= {f"{res['test_bpd']:.3f}", f"{res['val_bpd']:.3f}"}
    return numbers


def unlabelled_slice_numbers(text: str, allowed: set) -> list:
    """The numbers in `text` that stand beside the reference's results without being whole-test-set results
    or labelled as a slice; [] where `text` does not show a reference number."""
    numbers = BPD_LIKE.findall(text)
    if not REFERENCE & set(numbers) or "slice" in text.lower():
        return []
    return [n for n in numbers if n not in REFERENCE and n not in allowed]


def _units(chapter):
    """(where, text) for each markdown cell of the source and each output of the stored notebook."""
    nb = nbformat.read(chapter.with_suffix(".ipynb"), as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            yield f"markdown cell {i}", cell.source
        for j, out in enumerate(cell.get("outputs", [])):
            if "text" in out:
                yield f"cell {i}, output {j}", out["text"]
            for kind in ("text/markdown", "text/html", "text/plain"):
                if kind in out.get("data", {}):
                    yield f"cell {i}, output {j} ({kind})", out["data"][kind]


def test_the_checker_flags_an_unlabelled_slice_and_passes_labelled_or_whole_test_set_numbers():
    allowed = {"1.081"}
    assert unlabelled_slice_numbers("On 256 test images: 1.038. The reference reports 1.026.", allowed) == ["1.038"]
    assert unlabelled_slice_numbers("Test bpd 1.081 against the reference's 1.026.", allowed) == []
    assert unlabelled_slice_numbers("The slice of 256 images gives 1.038; the reference 1.026.", allowed) == []
    assert unlabelled_slice_numbers("On 256 test images: 1.038.", allowed) == []  # no comparison with the reference


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_chapter_compares_a_slice_with_the_reference_unlabelled(chapter):
    allowed = whole_test_set_numbers()
    bad = [(where, found) for where, text in _units(chapter) if (found := unlabelled_slice_numbers(text, allowed))]
    assert not bad, (f"{chapter.stem} sets bpd values that are neither the shipped whole-test-set results "
                     f"({', '.join(sorted(allowed))}) nor labelled as a slice beside the reference's "
                     f"{', '.join(sorted(REFERENCE))}: {bad}. Compare with the results JSONs' test_bpd, or say "
                     "'slice' where a slice is shown")
