"""The chapters as a static HTML book that renders its maths without a network.

    python -m flowbook.book            # book/index.html and book/NN_name.html (make html)

Each chapter's stored outputs (notebooks/NN_name.ipynb, see flowbook.outputs) are converted with
nbconvert; MathJax is copied from the `jupyter-server-mathjax` package into book/mathjax/ and loaded
from there, so the formulas render offline (nbconvert's default loads MathJax from the web, and without a
network a reader sees raw `$...$`).
"""
from __future__ import annotations

import argparse
import html
import shutil
from pathlib import Path

import nbformat

from flowbook.config import PROJECT_ROOT
from flowbook.editions import chapters

MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"


def mathjax_folder() -> Path:
    """The MathJax 2 distribution shipped in the jupyter-server-mathjax package."""
    import jupyter_server_mathjax

    return Path(jupyter_server_mathjax.__file__).parent / "static"


def build(out: Path = PROJECT_ROOT / "book") -> list[Path]:
    """Write out/index.html, one page per chapter and out/mathjax/; return the pages."""
    from nbconvert import HTMLExporter

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "mathjax").exists():
        shutil.copytree(mathjax_folder(), out / "mathjax")
    exporter = HTMLExporter(mathjax_url=MATHJAX_URL)
    pages = []
    for source in chapters():
        nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
        body, _ = exporter.from_notebook_node(nb)
        page = out / f"{source.stem}.html"
        page.write_text(body, encoding="utf-8")
        pages.append(page)
    links = "\n".join(f'<li><a href="{p.name}">{html.escape(p.stem.replace("_", " "))}</a></li>' for p in pages)
    (out / "index.html").write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>flowbook</title>"
                                    f"</head><body><h1>flowbook</h1><ol>\n{links}\n</ol></body></html>\n",
                                    encoding="utf-8")
    return pages


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "book")
    args = parser.parse_args(argv)
    for page in build(args.out):
        print(f"wrote {page}")
    print(f"open {args.out / 'index.html'} in a browser")


if __name__ == "__main__":
    main()
