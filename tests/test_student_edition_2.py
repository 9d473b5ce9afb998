"""The student editions of chapters 5 and after run with exactly the expected NotImplementedErrors (see student_edition.py)."""
import pytest

from flowbook import editions
from student_edition import check_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors


@pytest.mark.parametrize("source", editions.chapters()[4:], ids=lambda p: p.stem)
def test_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors(source):
    check_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors(source)
