"""The shipped checkpoints' results, as the Markdown table the README shows.

    python -m flowbook.results                       # the table from checkpoints/<model>.json
    python -m flowbook.results --runs runs/cpu/*     # a runbook table of training runs (docs/training.md)
    python -m flowbook.results --curve-rows checkpoints/tarflow.pt tarflow tarflow2 ...   # docs/validation_curves.csv

tests/test_checkpoints.py checks that the README holds exactly this table, so that it can never disagree
with the results JSONs.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from flowbook import config
from flowbook.data import NUM_VAL
from flowbook.models import ALL_MODELS

REFERENCE_TEST_BPD = {"simple": 1.107, "vardeq": 1.066, "multiscale": 1.026}  # 200 epochs on a GPU


def load_results(folder: Path | None = None) -> dict:
    """{model: results JSON} for each shipped checkpoint in `folder` (default: checkpoints/)."""
    folder = folder or config.checkpoint_path()
    return {name: json.loads((folder / f"{name}.json").read_text())
            for name in ALL_MODELS if (folder / f"{name}.json").is_file()}


def results_table(folder: Path | None = None) -> str:
    """A Markdown table: test bpd (with its number of importance samples where not 8) and the number of test
    images it was computed on, validation bpd (with its number of images where not all NUM_VAL, and of
    importance samples where not one), training (epochs, images, hours, hardware), parameters."""
    lines = ["| model | test bpd | test images | validation bpd | reference (200 epochs) | epochs | images seen "
             "| training time | trained on | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in load_results(folder).items():
        hours = r["train_wall_s"] / 3600
        reference = f"{REFERENCE_TEST_BPD[name]:.3f}" if name in REFERENCE_TEST_BPD else "-"
        unusual = [f"{r['eval_images']['val']:,} images"] if r["eval_images"]["val"] != NUM_VAL else []
        unusual += [f"{r['val_importance_samples']} samples"] if r.get("val_importance_samples", 1) != 1 else []
        val = f"{r['val_bpd']:.3f}" + (f" ({', '.join(unusual)})" if unusual else "")
        k = r.get("importance_samples", 8)
        test = f"{r['test_bpd']:.3f}" + ("" if k == 8 else f" ({k} sample{'s' if k > 1 else ''})")
        lines.append(f"| {name} | {test} | {r['eval_images']['test']:,} | {val} | "
                     f"{reference} | {r['epochs']:g} | {int(r['images_seen']):,} | {hours:.1f} h | "
                     f"{'; '.join(r['train_hardware'])} | {r['parameters']:,} |")
    return "\n".join(lines)


CURVES_FILE = config.PROJECT_ROOT / "docs" / "validation_curves.csv"


def validation_curves(path: Path | None = None) -> dict:
    """{model: [(images seen, validation bpd, stage), ...]}: the one-sample validation bpd on the 10,000
    validation images after each recorded epoch of the runs that made the shipped checkpoints, against the
    images seen since their first stage began, from docs/validation_curves.csv (chapters 6 and 8 plot it)."""
    curves = {}
    with open(path or CURVES_FILE, newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["model"], []).append(
                (int(row["images_seen"]), float(row["val_bpd_1sample"]), int(row["stage"])))
    return curves


def val_curve_from_log(metrics_csv: Path, batch_size: int, score: str = "val_bpd") -> list[list]:
    """A stage's `val_curve` rebuilt from its Lightning log (the run folder's logs/version_0/metrics.csv),
    for a run trained before flowbook recorded the curve: [images seen, score] for each row with a `score`
    (the row's step is the last training step of that epoch, counted from 0)."""
    with open(metrics_csv, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(score)]
    if not rows:
        raise ValueError(f"{metrics_csv} has no {score!r} values: is it a log of that run, and did it finish an "
                         "epoch?")
    return [[(int(row["step"]) + 1) * batch_size, round(float(row[score]), 5)] for row in rows]


def curve_rows(path: Path, runs=()) -> list[str]:
    """The rows of docs/validation_curves.csv for the checkpoint at `path`: one per epoch that a stage of its
    history recorded (`val_curve`), the images counted from its first stage, the bpd to 3 decimals. `runs`
    names the stages' run folders as docs/training.md lists them (default `<model>/stage<k>`)."""
    from flowbook.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)
    rows, offset = [], 0
    for k, stage in enumerate(ckpt["meta"].get("history", []), start=1):
        run = runs[k - 1] if k <= len(runs) else f"{ckpt['arch']}/stage{k}"
        for epoch, (seen, score) in enumerate(stage.get("val_curve", []), start=1):
            rows.append(f"{ckpt['arch']},{run},{k},{epoch},{offset + int(seen)},{float(score):.3f},"
                        f"{stage['settings']['lr']:g}")
        offset += int(stage["images_seen"])
    return rows


def _run_summary(folder: Path) -> dict | None:
    """A run folder's train_summary.json, or, for a run that ended without writing it (stopped by hand),
    the summary its best checkpoint carries (the same fields, as of the epoch it was saved)."""
    summary_file = folder / "train_summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    from flowbook.checkpoints import read_checkpoint

    for path in folder.glob("*.pt"):
        ckpt = read_checkpoint(path)
        if "history" in ckpt["meta"]:
            return {"arch": ckpt["arch"], **ckpt["meta"]}
    return None


def _best_val(summary: dict) -> str:
    """The run's best validation score: bpd with one sample for a flow, the flow-matching loss otherwise."""
    if "best_val_bpd_1sample" in summary:
        return f"{summary['best_val_bpd_1sample']:.3f}"
    return f"{summary['best_val_cfm']:.4f} (flow-matching loss)"


def runs_table(folders) -> str:
    """A Markdown row per run folder (its train_summary.json, and <model>.json where evaluated): model,
    hardware, batch, peak lr, minutes, images seen, validation bpd (1 sample, during training) and test
    bpd (8 importance samples, on the images its results JSON records) where evaluated."""
    lines = ["| run | model | hardware | batch | peak lr | minutes | epochs | images seen | val bpd (1 sample) "
             "| test bpd |", "|---|---|---|---|---|---|---|---|---|---|"]
    for folder in map(Path, folders):
        summary = _run_summary(folder)
        if summary is None:
            continue
        stage = summary["history"][-1]
        results = folder / f"{summary['arch']}.json"
        test = json.loads(results.read_text())["test_bpd"] if results.is_file() else None
        lines.append(f"| {folder.parent.name}/{folder.name} | {summary['arch']} | {stage['hardware']} | {stage['settings']['batch_size']} "
                     f"| {stage['settings']['lr']:g} | {stage['wall_s'] / 60:.0f} | {stage['epochs']} "
                     f"| {stage['images_seen']:,} | {_best_val(summary)} "
                     f"| {'-' if test is None else f'{test:.3f}'} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, help="run folders: print the runbook table instead")
    parser.add_argument("--curve-rows", nargs="+", metavar=("CHECKPOINT", "RUN"),
                        help="print the checkpoint's rows of docs/validation_curves.csv instead (RUN: the name of "
                             "each stage's run folder, in order)")
    args = parser.parse_args(argv)
    if args.curve_rows:
        print("\n".join(curve_rows(Path(args.curve_rows[0]), args.curve_rows[1:])))
    else:
        print(runs_table(args.runs) if args.runs else results_table())


if __name__ == "__main__":
    main()
