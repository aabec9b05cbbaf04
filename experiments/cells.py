"""The three cells on the main job's text: Elman, GRU and LSTM, same budget, several seeds.

    python experiments/cells.py [--budget S] [--seeds 0,1,2] [--equal-params] [--jobs 2] [--out DIR]

Each run is `bptt-jax run configs/char_lm{,_gru,_lstm}.toml` (the main job's text, split, schedule and
dropout; each cell at its config's measured size and learning rate) with train.seed set and the
time limit --budget (default: the configs' 290 s). With --equal-params the GRU and LSTM also run at
the Elman config's parameter count (the widths that come closest; Chung et al. 2014 compare the
cells at roughly equal parameters). Writes DIR/results.md (per cell: best validation bits per
character, median [range] over seeds, steps and seconds), DIR/results.json and DIR/cells.png
(validation bits/char against seconds, one colour per cell). With --jobs 2 two runs share the
machine at a time, so each has about one core: compare the cells with each other, not with the
README's single-run figures.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
from dataclasses import replace
from pathlib import Path

import jax

from bptt_jax.command import runner
from bptt_jax.command.config import load_config
from bptt_jax.command.study import Entry, config_error, markdown_table, run_entries, run_one, spread
from bptt_jax.core.params import init_params

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)
CONFIGS = {"elman": "configs/char_lm.toml", "gru": "configs/char_lm_gru.toml", "lstm": "configs/char_lm_lstm.toml"}


def _count(spec) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_params(jax.random.key(0), spec))))


def parameter_count(config: str, overrides=()) -> int:
    _, spec, _ = runner.build(load_config(ROOT / config, list(overrides)))
    return _count(spec)


def equal_width(config: str, target: int, overrides=()) -> int:
    """The width N1 (the same for every layer) whose parameter count comes closest to ``target``."""
    _, spec, _ = runner.build(load_config(ROOT / config, list(overrides)))
    layers = len(spec.hidden_sizes)
    return min(range(8, 513, 4), key=lambda n: abs(_count(replace(spec, hidden_sizes=(n,) * layers)) - target))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=None, help="seconds per run (default: the configs' 290 s)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--equal-params", action="store_true", help="also GRU and LSTM at the Elman parameter count")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (smoke tests: a few)")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    ap.add_argument("--out", default="runs/cells_study")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = list(args.set)
    if args.budget is not None:
        common.append(f"train.time_limit_s={args.budget}")
    if args.steps is not None:
        common.append(f"train.steps={args.steps}")
    bad = config_error([Entry(cell, str(ROOT / cfg), tuple(common)) for cell, cfg in CONFIGS.items()])
    if bad:
        ap.error(bad)
    models: dict[str, tuple[str, list[str]]] = {cell: (cfg, []) for cell, cfg in CONFIGS.items()}
    counts = {cell: parameter_count(cfg, common) for cell, cfg in CONFIGS.items()}
    if args.equal_params:
        layers = len(load_config(ROOT / CONFIGS["elman"], common).model.hidden_sizes)
        for cell in ("gru", "lstm"):
            n = equal_width(CONFIGS[cell], counts["elman"], common)
            extra = [f"model.hidden_sizes={[n] * layers}"]
            models[f"{cell}-{n}"] = (CONFIGS[cell], extra)
            counts[f"{cell}-{n}"] = parameter_count(CONFIGS[cell], common + extra)
    entries = [
        Entry(f"{model}_seed{seed}", str(ROOT / cfg), tuple(common + extra + [f"train.seed={seed}"]))
        for model, (cfg, extra) in models.items()
        for seed in seeds
    ]
    bad = config_error(entries)
    if bad:
        ap.error(bad)
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.starmap(run_one, [(e, args.out) for e in entries])
        results = {e.label: r for e, r in zip(entries, done)}
    else:
        results = run_entries(entries, args.out)
    rows, record = [], {}
    for model, (cfg, extra) in models.items():
        runs = [results[f"{model}_seed{seed}"] for seed in seeds]
        bits = [r["summary"]["best_val_loss"] / LN2 for r in runs]
        finite = [b for b in bits if math.isfinite(b)]
        steps = [float(r["summary"]["steps"]) for r in runs]
        secs = [float(r["summary"]["seconds"]) for r in runs]
        sizes = load_config(ROOT / cfg, common + extra).model.hidden_sizes
        rows.append(
            [
                model,
                " x ".join(map(str, sizes)),
                f"{counts[model]:,}",
                len(runs),
                spread(finite, "{:.3f}"),
                spread(steps, "{:.0f}"),
                spread(secs, "{:.0f}"),
            ]
        )
        record[model] = [
            {"seed": s, "best_val_bits": b, "steps": int(st), "seconds": sc}
            for s, b, st, sc in zip(seeds, bits, steps, secs)
        ]
    header = ["cell", "N1 per layer", "parameters", "seeds", "best val bits/char", "steps", "seconds"]
    table = markdown_table(header, rows)
    budget = f"{args.budget:g} s" if args.budget else "the configs' time limit (290 s)"
    table += f"\nseeds {seeds}; median [min, max]; budget per run: {budget}; jobs at a time: {args.jobs}.\n"
    out = Path(args.out)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    plot(results, models, seeds, out / "cells.png")
    print(table)


def plot(results: dict, models: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        for j, seed in enumerate(seeds):
            pts = [
                (r["seconds"], r["val_loss"] / LN2) for r in results[f"{model}_seed{seed}"]["rows"] if "val_loss" in r
            ]
            if pts:
                ax.plot(*zip(*pts), color=colors[i % len(colors)], alpha=0.8, label=model if j == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("validation bits per character")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
