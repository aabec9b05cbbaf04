"""The adding problem at several lengths, several seeds: IRNN (relu, W11 = I) against the tanh RNN, and
the gated cells (LSTM with forget-gate bias 0 and 1, GRU).

    python experiments/adding.py [--models irnn,tanh] [--lengths 150,300,400] [--seeds 0,1,2]
                                 [--budget S] [--tanh-budget S] [--steps N] [--stop-below MSE]
                                 [--set SECTION.KEY=VALUE ...] [--jobs 2] [--out DIR]

Each run is `bptt-jax run configs/adding_{model}_{T}.toml` with train.seed set, where the model is
irnn, tanh, lstm or gru (lstm0 and lstm1 are the LSTM with model.forget_bias 0 and 1); a length
without its own config runs the model's T = 400 config with data.adding_length = T. --budget sets
the time limit of every model but tanh, --tanh-budget tanh's, --steps every run's step cap. Writes DIR/results.md (per model and length: median
and range over seeds of the best test MSE and of the time and steps to test MSE < 0.01),
DIR/results.json and DIR/adding.png (test MSE against seconds, one panel per length).
With --jobs 2 two runs share the machine at a time, so their seconds are each about one core's.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
from pathlib import Path

from bptt_jax.command.study import Entry, config_error, markdown_table, run_one, spread

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.01
# model -> (config name, overrides, label in tables and plots, colour)
MODELS = {
    "irnn": ("irnn", (), "IRNN", "tab:blue"),
    "tanh": ("tanh", (), "tanh", "tab:red"),
    "lstm0": ("lstm", ("model.forget_bias=0.0",), "LSTM, forget bias 0", "tab:orange"),
    "lstm1": ("lstm", ("model.forget_bias=1.0",), "LSTM, forget bias 1", "tab:green"),
    "gru": ("gru", (), "GRU", "tab:purple"),
}


def config_for(model: str, t: int) -> tuple[str, tuple[str, ...]]:
    """(config path, overrides) of one model at length T: its own config, or its T = 400 one with T set."""
    name, sets, _, _ = MODELS[model]
    own = ROOT / f"configs/adding_{name}_{t}.toml"
    if own.exists():
        return str(own), sets
    return str(ROOT / f"configs/adding_{name}_400.toml"), sets + (f"data.adding_length={t}",)


def _limit(budget: float | None) -> str:
    return f"{budget:g} s" if budget else "the config's (540 s)"


def summarize(results: dict, entries: list[Entry]) -> tuple[list[list], dict]:
    groups: dict[tuple[str, int], list] = {}
    for e in entries:
        model, t, seed = e.label.split("_")
        groups.setdefault((model, int(t[1:])), []).append((int(seed[4:]), results[e.label]))
    rows, record = [], {}
    order = list(MODELS)
    for (model, t), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        best, hit_s, hit_steps, notes = [], [], [], []
        per_seed = []
        for seed, res in sorted(runs, key=lambda r: r[0]):
            s = res["summary"]
            hit = next((r for r in res["rows"] if r.get("val_loss", math.inf) < TARGET), None)
            best.append(s["best_val_loss"])
            if hit:
                hit_s.append(hit["seconds"])
                hit_steps.append(hit["step"])
            stopped = str(s.get("stopped_by"))
            if "non-finite" in stopped:
                notes.append(f"seed {seed} diverged (NaN) at step {s['steps']}")
            per_seed.append(
                {
                    "seed": seed,
                    "best_test_mse": s["best_val_loss"],
                    "steps": s["steps"],
                    "seconds": s["seconds"],
                    "step_below_target": hit["step"] if hit else None,
                    "seconds_below_target": hit["seconds"] if hit else None,
                    "stopped_by": stopped[:200],
                }
            )
        finite = [b for b in best if math.isfinite(b)]
        rows.append(
            [
                MODELS[model][2],
                t,
                len(runs),
                spread(finite, "{:.4f}"),
                f"{len(hit_s)}/{len(runs)}",
                spread(hit_s, "{:.0f}"),
                spread([float(x) for x in hit_steps], "{:.0f}"),
                "; ".join(notes) or "-",
            ]
        )
        record[f"{model}_T{t}"] = per_seed
    return rows, record


def plot(results: dict, entries: list[Entry], path: Path, lengths: list[int], seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for e in entries:
        model, t, seed = e.label.split("_")
        ax = axes[0][lengths.index(int(t[1:]))]
        pts = [(r["seconds"], r["val_loss"]) for r in results[e.label]["rows"] if "val_loss" in r]
        if pts:
            first = int(seed[4:]) == seeds[0]  # one legend entry per model
            ax.plot(
                *zip(*pts),
                color=MODELS[model][3],
                alpha=0.8,
                label=MODELS[model][2] if first else None,
            )
    for ax, t in zip(axes[0], lengths):
        ax.axhline(TARGET, color="gray", ls=":", lw=1)
        ax.axhline(1 / 6, color="gray", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"T = {t}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("test MSE")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="irnn,tanh", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--lengths", default="150,300,400", help="comma-separated T values")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    ap.add_argument(
        "--budget", type=float, default=None, help="time limit in seconds of all but tanh (default: the config's)"
    )
    ap.add_argument("--tanh-budget", type=float, default=None, help="tanh time limit (default: the config's)")
    ap.add_argument(
        "--stop-below", type=float, default=0.0, help="runs but tanh stop at a test MSE below this (0: run the budget)"
    )
    ap.add_argument("--steps", type=int, default=None, help="every run's step cap (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override in every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    ap.add_argument("--out", default="runs/adding_study")
    args = ap.parse_args()
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError as err:
        ap.error(f"--lengths and --seeds take comma-separated integers: {err}")
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; allowed: {list(MODELS)}")
    entries = []
    for t in lengths:
        for model in models:
            budget = args.tanh_budget if model == "tanh" else args.budget
            config, model_sets = config_for(model, t)
            for seed in seeds:
                sets = list(model_sets) + [f"train.seed={seed}"] + ([f"train.time_limit_s={budget}"] if budget else [])
                if args.steps:
                    sets.append(f"train.steps={args.steps}")
                if model != "tanh" and args.stop_below:
                    sets.append(f"train.stop_below={args.stop_below}")
                sets += args.set
                entries.append(Entry(f"{model}_T{t}_seed{seed}", config, tuple(sets)))
    bad = config_error(entries)
    if bad:
        ap.error(bad)
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.starmap(run_one, [(e, args.out) for e in entries])
        results = {e.label: r for e, r in zip(entries, done)}
    else:
        results = {e.label: run_one(e, args.out) for e in entries}
    rows, record = summarize(results, entries)
    header = [
        "model",
        "T",
        "seeds",
        "best test MSE, median [range]",
        "seeds < 0.01",
        "seconds to < 0.01",
        "steps to < 0.01",
        "notes",
    ]
    table = markdown_table(header, rows)
    cap = args.steps or "the config's"
    table += (
        f"\nSeeds {seeds}; always predicting 1 scores MSE 1/6 = 0.167; {args.jobs} run(s) at a time; time limit "
        f"{_limit(args.budget)} (tanh: {_limit(args.tanh_budget)}), step cap {cap}, "
        f"stopping at the first test MSE below {args.stop_below or 'nothing'} (not tanh).\n"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "results.md").write_text(table)
    Path(args.out, "results.json").write_text(json.dumps(record, indent=1))
    plot(results, entries, Path(args.out, "adding.png"), lengths, seeds)
    print(table)


if __name__ == "__main__":
    main()
