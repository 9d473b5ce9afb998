"""The shipped checkpoints' results, as the Markdown table the README shows.

    python -m flowbook.results        # prints the table from checkpoints/<model>.json

tests/test_checkpoints.py checks that the README holds exactly this table, so that it can never disagree
with the results JSONs.
"""
from __future__ import annotations

import json
from pathlib import Path

from flowbook import config
from flowbook.models import MODEL_NAMES

REFERENCE_TEST_BPD = {"simple": 1.107, "vardeq": 1.066, "multiscale": 1.026}  # 200 epochs on a GPU


def load_results(folder: Path | None = None) -> dict:
    """{model: results JSON} for each shipped checkpoint in `folder` (default: checkpoints/)."""
    folder = folder or config.checkpoint_path()
    return {name: json.loads((folder / f"{name}.json").read_text())
            for name in MODEL_NAMES if (folder / f"{name}.json").is_file()}


def results_table(folder: Path | None = None) -> str:
    """A Markdown table: test and validation bpd, training (epochs, images, hours, hardware), parameters."""
    lines = ["| model | test bpd | validation bpd | reference (200 epochs) | epochs | images seen | training time "
             "| trained on | parameters |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in load_results(folder).items():
        hours = r["train_wall_s"] / 3600
        lines.append(f"| {name} | {r['test_bpd']:.3f} | {r['val_bpd']:.3f} | {REFERENCE_TEST_BPD[name]:.3f} | "
                     f"{r['epochs']:g} | {int(r['images_seen']):,} | {hours:.1f} h | {'; '.join(r['train_hardware'])} | "
                     f"{r['parameters']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(results_table())
