"""Every chapter: a .py/.ipynb pair in sync, and the parts a chapter must have.

(nbval executes the notebooks themselves: `pytest notebooks --nbval-lax`, part of `make test`.)
"""
import re

import jupytext
import nbformat
import pytest

from conftest import ROOT

CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
EXPECTED = ["01_change_of_variables", "02_dequantization", "03_coupling_layers", "04_multiscale", "05_analysis",
            "06_beyond_realnvp", "07_continuous_time", "08_transformer_flows"]


def _cells(nb):
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def test_the_chapters_exist_in_order():
    assert [p.stem for p in CHAPTERS] == EXPECTED


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_notebook_pair_is_in_sync(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `make sync`"
    from_py = jupytext.read(source)
    from_ipynb = nbformat.read(ipynb, as_version=4)
    assert _cells(from_py) == _cells(from_ipynb), f"{ipynb.name} is out of sync with {source.name}: run `make sync`"


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_has_learning_goals_summary_exercises_and_references(source):
    nb = jupytext.read(source)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for heading in ("**You will learn**", "**Learning objectives.**", "## Summary", "## Exercises", "## References"):
        assert heading in markdown, f"{source.name} lacks {heading}"
    exercises = re.findall(r"^### Exercise (\d+)", markdown, flags=re.M)
    assert exercises == [str(i) for i in range(1, len(exercises) + 1)]
    implementation = re.findall(r"^### Exercise .*\(implementation", markdown, flags=re.M)
    assert len(implementation) >= (2 if source.name.startswith("01_") else 3), "too few implementation exercises"
    assert len(exercises) > len(implementation), "every chapter has a conceptual question too"
    for heading in re.findall(r"^### Exercise .*$", markdown, flags=re.M):  # a lecturer picks by kind, points, size
        kind = r"\((implementation|conceptual), \d+(?: \+ \d+)* points?, about \d+ minutes\)$"
        assert re.search(kind, heading), heading


def test_the_chapters_have_at_least_14_implementation_exercises():
    markdown = "\n".join(c.source for src in CHAPTERS for c in jupytext.read(src).cells if c.cell_type == "markdown")
    assert len(re.findall(r"^### Exercise .*\(implementation", markdown, flags=re.M)) >= 14


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_keeps_the_house_rules(source):
    code = "\n".join(c.source for c in jupytext.read(source).cells if c.cell_type == "code")
    assert "svg" not in code.lower() and "pdf" not in code.lower(), "figures are PNG"
    assert not re.search(r"^\s*if .*(CI|QUICK|quick)\b", code, flags=re.M), "quick/full comes from flowbook.config"
    assert not re.search(r"^class (CouplingLayer|Dequantization|SqueezeFlow|SplitFlow|GatedConvNet)\b", code, re.M), \
        "a chapter never re-defines what flowbook provides"
    assert not re.search(r"^\s*device\s*=\s*torch\.device", code, flags=re.M), "the device comes from flowbook.config"


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_every_stub_has_a_solution_and_a_checker(source):
    cells = jupytext.read(source).cells
    for i, cell in enumerate(cells):
        tags = cell.metadata.get("tags", [])
        if "student" in tags:
            assert "raise NotImplementedError(\"Exercise" in cell.source
            assert "solution" in cells[i + 1].metadata.get("tags", []), f"stub {i} has no solution after it"
            assert "exercises.check_" in cells[i + 2].source, f"stub {i} has no checker cell"
        if "answer" in tags:
            assert cell.cell_type == "markdown" and cells[i - 1].source.lstrip().startswith("### Exercise")


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_notebook_carries_outputs_computed_from_its_current_source(source):
    from flowbook.outputs import source_sha256

    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    recorded = nb.metadata.get("flowbook", {}).get("source_sha256")
    assert recorded == source_sha256(source), \
        f"{source.with_suffix('.ipynb').name} holds no outputs of the current {source.name}: run `make outputs`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2, "most code cells show something"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])
                   if "raises-exception" not in c.metadata.get("tags", [])), "a stored output is an error"
    figures = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, "a chapter shows its figures before it is run"


def test_the_readme_gives_each_chapters_time_from_its_stored_outputs():
    from flowbook.outputs import cell_seconds

    readme = (ROOT / "README.md").read_text()
    for source in CHAPTERS:
        row = re.search(rf"^\| \[{source.stem}\]\(.*\| (\d+) s \|$", readme, flags=re.M)
        assert row, f"the README's chapter table has no time for {source.stem}"
        seconds = cell_seconds(source.with_suffix(".ipynb"))
        assert seconds > 0, f"{source.stem}'s stored outputs carry no cell timings"
        assert int(row.group(1)) == round(seconds), \
            f"README: {source.stem} {row.group(1)} s, its stored outputs {seconds:.0f} s (after `make outputs`)"


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_solutions_and_answers_are_collapsed_so_a_reader_meets_the_question_first(source):
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    for cell in nb.cells:
        if {"solution", "answer"} & set(cell.metadata.get("tags", [])):
            assert cell.metadata.get("jupyter", {}).get("source_hidden") is True, cell.source[:60]


def test_html_book_loads_mathjax_from_its_own_folder(tmp_path):
    from flowbook.book import build

    pages = build(tmp_path)
    assert [p.stem for p in pages] == EXPECTED and (tmp_path / "index.html").is_file()
    assert (tmp_path / "mathjax" / "MathJax.js").is_file(), "MathJax must be copied for offline reading"
    page = pages[1].read_text()
    assert 'src="mathjax/MathJax.js' in page and not re.search(r"https?://[^\"']*mathjax", page, flags=re.I)
    assert "\\log" in page, "the maths is in the page, for MathJax to render"


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_saving_a_chapter_unchanged_leaves_both_files_as_they_are(source):
    """What JupyterLab does on save: nbformat writes the .ipynb, and Jupytext the paired .py from it."""
    from jupytext.config import load_jupytext_config

    ipynb = source.with_suffix(".ipynb")
    text = ipynb.read_text()
    nb = nbformat.reads(text, as_version=4)
    assert nbformat.writes(nb) + "\n" == text, f"saving {ipynb.name} would rewrite it"
    config = load_jupytext_config(str(source.parent))
    assert jupytext.writes(nb, fmt="py:percent", config=config) == source.read_text(), \
        f"saving {ipynb.name} would rewrite {source.name}"


def test_every_chapters_student_edition_is_run_by_one_test_file():
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from student_edition import GROUPS

    numbers = [n for g in GROUPS for n in g]
    assert sorted(numbers) == [p.stem[:2] for p in CHAPTERS], "add the new chapter to student_edition.GROUPS"
    assert len(GROUPS) == len(list((ROOT / "tests").glob("test_student_edition_*.py")))
