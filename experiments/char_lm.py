"""Character language model on the built-in text: bits per character against steps and seconds.

    python experiments/char_lm.py [--budget SECONDS] [--agree-steps N] [--out DIR]

Three comparisons in one table (DIR/results.md) and plot (DIR/char_lm.png):
- the default model (configs/char_lm.toml) trained with the explicit BPTT and with jax.grad for the
  same N steps: the two curves must agree to float tolerance;
- the default model against the min-char-rnn baseline (configs/min_char_rnn.toml) for the same
  wall-clock budget on the same text.
"""

import argparse
import math
from pathlib import Path

from bptt_jax.command.study import Entry, config_error, markdown_table, plot_curves, run_entries

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=290.0, help="wall-clock seconds for the race")
    ap.add_argument("--agree-steps", type=int, default=200, help="steps of the bptt-vs-autodiff comparison")
    ap.add_argument("--out", default="runs/char_lm_study")
    args = ap.parse_args()
    cfg = str(ROOT / "configs/char_lm.toml")
    short = (f"train.steps={args.agree_steps}", "train.time_limit_s=0", "train.eval_every=100", "train.log_every=1")
    entries = [
        Entry("bptt_short", cfg, short + ("train.grad='bptt'",)),
        Entry("autodiff_short", cfg, short + ("train.grad='autodiff'",)),
        Entry("default", cfg, (f"train.time_limit_s={args.budget}",)),
        Entry("min_char_rnn", str(ROOT / "configs/min_char_rnn.toml"), (f"train.time_limit_s={args.budget}",)),
    ]
    bad = config_error(entries)
    if bad:
        ap.error(bad)
    results = run_entries(entries, args.out)
    # Same seed, same batches, same dropout masks: the two runs differ only by float32 rounding,
    # which the training dynamics (Adam divides by tiny second moments) amplify after a while.
    ra, rb = results["bptt_short"]["rows"], results["autodiff_short"]["rows"]
    rel = [abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(ra, rb)]
    first_off = next((x["step"] for x, e in zip(ra, rel) if e > 1e-4), None)
    agree = [(x["step"], x["val_loss"] / LN2, y["val_loss"] / LN2) for x, y in zip(ra, rb) if "val_loss" in x]
    rows = []
    for label, res in results.items():
        s = res["summary"]
        rows.append([label, s["best_val_loss"] / LN2, s["steps"], s["seconds"], s["steps"] / max(s["seconds"], 1e-9)])
    table = markdown_table(["run", "best validation bits/char", "steps", "seconds", "steps/s"], rows)
    table += (
        f"\nbptt vs autodiff, same seed and batches: largest relative difference of the training loss "
        f"over steps 1-20: {max(rel[:20]):.1e}; over steps 1-100: {max(rel[:100]):.1e}; first step "
        f"above 1e-4: {first_off or 'none'}. Validation bits/char (step, bptt, autodiff): "
        + ", ".join(f"({s}, {a:.4f}, {b:.4f})" for s, a, b in agree)
        + ".\nUnigram baseline: "
        f"{results['default']['summary']['baseline']['unigram_entropy_bits']:.3f} bits/char.\n"
    )
    Path(args.out, "results.md").write_text(table)
    plot_curves(
        {k: results[k] for k in ("default", "min_char_rnn")},
        Path(args.out, "char_lm.png"),
        scale=1 / LN2,
        ylabel="validation bits per character",
    )
    plot_curves(
        {k: results[k] for k in ("bptt_short", "autodiff_short")},
        Path(args.out, "bptt_vs_autodiff.png"),
        scale=1 / LN2,
        ylabel="validation bits per character",
    )
    print(table)


if __name__ == "__main__":
    main()
