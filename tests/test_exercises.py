"""Exercise checkers pass the chapters' solutions and catch plausible mistakes; the editions are right."""
import math
import re

import jupytext
import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import ROOT
from flowbook import editions, exercises
from flowbook.layers import SqueezeFlow

CHAPTERS = editions.chapters()


def _tagged_cells(tag):
    return [(src, c) for src in CHAPTERS for c in jupytext.read(src).cells if tag in c.metadata.get("tags", [])]


def _namespace(tag):
    """Everything the chapters' `tag` cells define, executed with the chapters' imports."""
    ns = {"torch": torch, "math": math}
    for _, cell in _tagged_cells(tag):
        exec(cell.source, ns)
    return ns


SOLUTIONS = _namespace("solution")
STUBS = _namespace("student")
CHECKS = {  # checker: name defined by the chapter's exercise
    "check_change_of_variables": "log_prob_affine", "check_bits_per_dim": "bits_per_dim",
    "check_logit_transform": "logit_transform", "check_importance_weighted_bpd": "importance_weighted_bpd",
    "check_checkerboard_mask": "checkerboard_mask", "check_additive_coupling": "AdditiveCoupling",
    "check_squeeze": "squeeze", "check_interpolate": "interpolate", "check_temperature_latent": "temperature_latent",
}


def test_every_checker_is_used_by_a_chapter():
    used = set(re.findall(r"exercises\.(check_\w+)", " ".join(c.source for src in CHAPTERS
                                                             for c in jupytext.read(src).cells)))
    assert used == set(CHECKS) == set(exercises.__all__)


@pytest.mark.parametrize("checker, name", CHECKS.items())
def test_checker_passes_the_chapter_solution(checker, name, capsys):
    assert getattr(exercises, checker)(SOLUTIONS[name]) is True
    assert "all" in capsys.readouterr().out


@pytest.mark.parametrize("checker, name", CHECKS.items())
def test_checker_lets_the_stub_raise_not_implemented(checker, name):
    with pytest.raises(NotImplementedError, match=r"^Exercise \d: "):
        getattr(exercises, checker)(STUBS[name])


def _wrong_additive_sign_ldj(network, mask):
    layer = SOLUTIONS["AdditiveCoupling"](network, mask)

    class Wrong(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = layer

        def forward(self, z, ldj, reverse=False):
            z, ldj = self.inner(z, ldj, reverse)
            return z, ldj + (1 if not reverse else -1) * z.sum(dim=[1, 2, 3]) * 0.01  # a bogus log-det

    return Wrong()


class _ForgotMask(torch.nn.Module):
    def __init__(self, network, mask):
        super().__init__()
        self.network = network
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False):
        t = self.network(z * self.mask)  # forgot * (1 - mask): changes the kept half too
        return (z + t if not reverse else z - t), ldj


class _NetworkSeesAll(_ForgotMask):
    def forward(self, z, ldj, reverse=False):
        t = self.network(z) * (1 - self.mask)  # not invertible: t depends on the half it changes
        return (z + t if not reverse else z - t), ldj


def _squeeze_off_by_one(z, reverse=False):  # mixes up rows and columns inside each 2x2 block
    B, C, H, W = z.shape
    if not reverse:
        return z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 5, 3, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
    return SqueezeFlow()(z, None, reverse=True)[0]


def _squeeze_channels_last(z, reverse=False):  # block pixels grouped by position, not by channel
    B, C, H, W = z.shape
    if not reverse:
        return z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
    return SqueezeFlow()(z, None, reverse=True)[0]


WRONG = {
    "check_change_of_variables": [
        lambda x, a, b: torch.distributions.Normal(0.0, 1.0).log_prob((x - b) / a),  # no volume term
        lambda x, a, b: torch.distributions.Normal(0.0, 1.0).log_prob((x - b) / a) - math.log(a),  # log of a < 0
        lambda x, a, b: torch.distributions.Normal(0.0, 1.0).log_prob((x - b) / a) + math.log(abs(a)),  # sign
    ],
    "check_bits_per_dim": [
        lambda ll, d: -ll / d,  # nats, not bits
        lambda ll, d: -ll / (d * math.log(10)),
    ],
    "check_logit_transform": [
        lambda u, a: (torch.logit((1 - a) * u + a / 2),  # wrong sign of the log-determinant
                      -(math.log(1 - a) - torch.log((1 - a) * u + a / 2) - torch.log1p(-(1 - a) * u - a / 2))
                      .flatten(1).sum(1)),
        lambda u, a: (torch.logit((1 - a) * u + a / 2),  # forgot the alpha term
                      (-torch.log((1 - a) * u + a / 2) - torch.log1p(-(1 - a) * u - a / 2)).flatten(1).sum(1)),
        lambda u, a: (torch.logit(u), (-torch.log(u) - torch.log1p(-u)).flatten(1).sum(1)),  # no squeeze
    ],
    "check_importance_weighted_bpd": [
        lambda lls, d: -lls.mean(0) / (d * math.log(2)),  # Jensen, not importance-weighted
        lambda lls, d: -torch.log(lls.exp().mean(0)) / (d * math.log(2)),  # unstable
        lambda lls, d: -torch.logsumexp(lls, 0) / (d * math.log(2)),  # forgot - log K
    ],
    "check_checkerboard_mask": [
        lambda h, w, invert=False: 1 - SOLUTIONS["checkerboard_mask"](h, w, invert),  # starts with 1
        lambda h, w, invert=False: SOLUTIONS["checkerboard_mask"](h, w, False),  # ignores invert
        lambda h, w, invert=False: SOLUTIONS["checkerboard_mask"](h, w, invert).double(),  # wrong dtype
    ],
    "check_additive_coupling": [_wrong_additive_sign_ldj, _ForgotMask, _NetworkSeesAll],
    "check_squeeze": [_squeeze_off_by_one, _squeeze_channels_last,
                      lambda z, reverse=False: z.reshape(z.shape[0], -1, z.shape[2] // 2, z.shape[3] // 2)],
    "check_interpolate": [
        lambda a, b, n: (1 - torch.linspace(0, 1, n + 2)[1:-1].view(-1, 1, 1, 1)) * a
                        + torch.linspace(0, 1, n + 2)[1:-1].view(-1, 1, 1, 1) * b,  # leaves out the ends
        lambda a, b, n: (1 - torch.arange(n).view(-1, 1, 1, 1) / n) * a
                        + torch.arange(n).view(-1, 1, 1, 1) / n * b,  # off by one: never reaches z_b
        lambda a, b, n: torch.linspace(0, 1, n).view(-1, 1, 1, 1) * a
                        + (1 - torch.linspace(0, 1, n).view(-1, 1, 1, 1)) * b,  # backwards
    ],
    "check_temperature_latent": [
        lambda shape, t: torch.randn(shape) * t ** 2,  # variance, not standard deviation
        lambda shape, t: torch.randn(shape) + t,  # shifts instead of scaling
        lambda shape, t: torch.randn(shape, dtype=torch.float64) * t,  # dtype
    ],
}


@pytest.mark.parametrize("checker, index", [(c, i) for c, wrongs in WRONG.items() for i in range(len(wrongs))])
def test_checker_catches_a_plausible_mistake_and_says_what(checker, index, capsys):
    assert getattr(exercises, checker)(WRONG[checker][index]) is False
    out = capsys.readouterr().out
    assert out.startswith("✗") and ("failed" in out or "raised" in out), out


def test_solutions_edition_has_no_stubs_and_keeps_everything_else(tmp_path):
    for src in CHAPTERS:
        full = jupytext.read(src)
        edition = editions.make_edition(src, "solutions")
        assert not any("student" in c.metadata.get("tags", []) for c in edition.cells)
        assert len(edition.cells) == len(full.cells) - sum("student" in c.metadata.get("tags", []) for c in full.cells)


def test_student_edition_has_stubs_and_neither_solutions_nor_answers_and_key_has_answers(tmp_path):
    written = editions.write_edition("student", tmp_path, CHAPTERS)
    assert [p.stem for p in written] == [p.stem for p in CHAPTERS]
    for path in written:
        text = path.read_text()
        assert "NotImplementedError" in text and "**Answer.**" not in text
        assert not any("solution" in c.metadata.get("tags", []) for c in nbformat.read(path, 4).cells)
    key = (ROOT / "answers" / "answer_key.md").read_text()
    assert key.count("**Answer.**") == len(_tagged_cells("answer")) >= len(CHAPTERS)


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_student_edition_runs_and_raises_exactly_the_expected_not_implemented_errors(source, tmp_path):
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
    assert got == [("NotImplementedError", s) for s in stubs], \
        f"expected one NotImplementedError per stub {stubs}, got {got}\n{unexpected}"
    for i, _ in errors:
        assert "exercises.check_" in nb.cells[i].source, f"cell {i} failed, which is no exercise check"
        assert "raises-exception" in nb.cells[i].metadata.get("tags", []), "nbval would fail on this cell"


def test_a_students_edited_notebook_survives_a_second_make_student(tmp_path):
    first = editions.write_edition("student", tmp_path, CHAPTERS[:2])
    work = nbformat.read(first[0], 4)
    work.cells[-1].source += "\n# my own notes"
    nbformat.write(work, first[0])
    mine = first[0].read_text()
    untouched_before = editions.fingerprint(nbformat.read(first[1], 4))
    again = editions.write_edition("student", tmp_path, CHAPTERS[:2])
    assert first[0].read_text() == mine, "the student's edited notebook was overwritten"
    assert again[0].name == f"{CHAPTERS[0].stem}.new.ipynb" and again[0].exists()
    assert again[1] == first[1] and editions.fingerprint(nbformat.read(first[1], 4)) == untouched_before
    editions.write_edition("student", tmp_path, CHAPTERS[:1], force=True)
    assert "my own notes" not in first[0].read_text()


def test_a_second_make_student_from_the_command_line_names_the_files_it_did_not_touch(tmp_path):
    import subprocess
    import sys

    run = [sys.executable, "-m", "flowbook.editions", "student", "--out", str(tmp_path)]
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True, timeout=300)
    path = tmp_path / f"{CHAPTERS[0].stem}.ipynb"
    nb = nbformat.read(path, 4)
    nb.cells[0].source += " (edited)"
    nbformat.write(nb, path)
    result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "NOT touched" in result.stdout and path.name in result.stdout
    assert "(edited)" in path.read_text()


def test_editions_refuse_the_sources_folder_and_name_broken_cells(tmp_path):
    with pytest.raises(editions.EditionError, match="never written into"):
        editions.write_edition("student", editions.NOTEBOOKS, CHAPTERS[:1])
    broken = tmp_path / "09_broken.py"
    broken.write_text('# %% [markdown]\n# A chapter\n\n# %%\nx = 1\n\n# %% tags=["solutoin"]\ny = 2\n')
    with pytest.raises(editions.EditionError, match=r"09_broken.py, cell 3: unknown tag 'solutoin'"):
        editions.make_edition(broken, "student")
    broken.write_text('# %% [markdown]\n# A chapter\n\n# %%\ndef f(:\n    pass\n')
    with pytest.raises(editions.EditionError, match=r"09_broken.py, cell 2, line 1: syntax error"):
        editions.write_edition("student", tmp_path / "out", [broken])
    assert not (tmp_path / "out").exists(), "nothing is written when a source is broken"


def test_student_edition_has_an_empty_answer_cell_under_each_conceptual_question():
    for src in CHAPTERS:
        cells = editions.make_edition(src, "student").cells
        full = jupytext.read(src).cells
        questions = sum("answer" in c.metadata.get("tags", []) for c in full)
        slots = [i for i, c in enumerate(cells) if c.source == editions.ANSWER_HERE]
        assert len(slots) == questions, src.name
        assert all(cells[i - 1].cell_type == "markdown" and "Exercise" in cells[i - 1].source for i in slots)
