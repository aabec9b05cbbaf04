"""Bidirectional against unidirectional networks on masked-character infill.

    python experiments/infill.py [--budget SECONDS] [--out DIR]

Writes DIR/results.md (accuracy and bits per character on the masked characters) and DIR/infill.png.
"""

import argparse
import math
from pathlib import Path

from bptt_jax.command.study import Entry, config_error, markdown_table, plot_curves, run_entries

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds per run")
    ap.add_argument("--out", default="runs/infill_study")
    args = ap.parse_args()
    common = (f"train.time_limit_s={args.budget}",)
    entries = [
        Entry("bidirectional", str(ROOT / "configs/infill_bi.toml"), common),
        Entry("unidirectional", str(ROOT / "configs/infill_uni.toml"), common),
    ]
    bad = config_error(entries)
    if bad:
        ap.error(bad)
    results = run_entries(entries, args.out)
    rows = []
    for label, res in results.items():
        s = res["summary"]
        rows.append([label, s["best_val_accuracy"], s["best_val_loss"] / math.log(2), s["steps"], s["seconds"]])
    table = markdown_table(["network", "masked-char accuracy", "bits/char (masked)", "steps", "seconds"], rows)
    Path(args.out, "results.md").write_text(table)
    plot_curves(results, Path(args.out, "infill.png"), key="val_accuracy", ylabel="masked-character accuracy")
    print(table)


if __name__ == "__main__":
    main()
