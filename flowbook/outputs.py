"""Run the chapters and store their outputs in notebooks/NN_name.ipynb, so that a reader sees every figure,
table and number on opening a chapter, before running anything.

    python -m flowbook.outputs                  # every chapter (make outputs)
    python -m flowbook.outputs 05_analysis      # one

Each chapter runs top to bottom in a fresh kernel in quick mode (the mode CI checks; it uses the shipped
checkpoints where the chapter shows trained models). The notebook records the sha256 of the source it was
run from (`metadata.flowbook.source_sha256`); tests/test_notebooks.py fails when a chapter's outputs are
missing or come from an older source. The .py stays the source you edit; this only refreshes the .ipynb.
The README's chapter times are `cell_seconds` of the stored outputs (a test checks them).
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import datetime
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

from flowbook.editions import chapters
from flowbook.provenance import file_sha256

TIMEOUT_S = 1800


def source_sha256(source: Path) -> str:
    """sha256 of a chapter source's text: what its stored outputs were computed from."""
    return file_sha256(source)


def cell_seconds(notebook: Path) -> float:
    """Seconds the stored outputs of `notebook` (an .ipynb) took to compute: the sum over its code cells of
    the execution times the kernel recorded (kernel start-up not included). 0.0 without timings."""
    nb = nbformat.read(notebook, as_version=4)
    total = 0.0
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            total += (end - start).total_seconds()
    return total


def run_chapter(source: Path, mode: str = "quick") -> nbformat.NotebookNode:
    """Execute the chapter `source` (notebooks/NN_name.py) in a fresh kernel with FLOWBOOK_MODE=`mode`
    and return the notebook with its outputs and the source's fingerprint."""
    nb = jupytext.read(source)
    before = os.environ.get("FLOWBOOK_MODE")
    os.environ["FLOWBOOK_MODE"] = mode
    try:
        NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", coalesce_streams=True,
                       resources={"metadata": {"path": str(source.parent)}}).execute()
    finally:
        if before is None:
            os.environ.pop("FLOWBOOK_MODE", None)
        else:
            os.environ["FLOWBOOK_MODE"] = before
    nb.metadata["flowbook"] = {"source_sha256": source_sha256(source), "mode": mode}
    return nb


def write_outputs(sources, mode: str = "quick") -> list[tuple[Path, float]]:
    """Run each chapter and write it, with its outputs, to its .ipynb; return (path, seconds) of each."""
    done = []
    for source in tqdm(list(sources), desc="chapters", unit="chapter"):
        start = time.monotonic()
        nb = run_chapter(source, mode)
        target = source.with_suffix(".ipynb")
        jupytext.write(nb, target, fmt="ipynb")
        done.append((target, time.monotonic() - start))
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter names, e.g. 05_analysis (default: all)")
    parser.add_argument("--mode", default="quick", choices=("quick", "full"))
    args = parser.parse_args(argv)
    sources = [s for s in chapters() if not args.chapters or s.stem in args.chapters]
    unknown = set(args.chapters) - {s.stem for s in sources}
    if unknown:
        parser.error(f"no such chapter: {', '.join(sorted(unknown))}; the chapters are "
                     f"{', '.join(s.stem for s in chapters())}")
    for path, seconds in write_outputs(sources, args.mode):
        print(f"{path.name}: {seconds:.0f} s")


if __name__ == "__main__":
    main()
