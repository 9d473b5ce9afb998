"""The student editions of chapters 07 run with exactly the expected NotImplementedErrors (see
student_edition.py, which groups the chapters so that the test processes finish together)."""
import pytest

from student_edition import check_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors, group


@pytest.mark.parametrize("source", group(2), ids=lambda p: p.stem)
def test_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors(source):
    check_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors(source)
