"""The vanishing / exploding gradient picture at T = 200: ||dDIV/dh(t)|| against the distance from
a loss on the last step, for W11 = rho Q (Q random orthogonal), tanh and linear, and for the IRNN.

    python experiments/gradflow.py [--seeds 0,1,2] [--irnn-run RUN_DIR] [--lstm-run RUN_DIR [--lstm-only]]
                                   [--out DIR]

For rho in {0.5, 0.9, 1.0, 1.1, 1.5}: a tanh network (100 units, the adding task's inputs, one
batch of 64) and the same network with f1 = identity; plus the IRNN (relu, W11 = I). Writes
DIR/results.md (fitted per-step rate, median and range over the seeds, against rho),
DIR/gradflow.png (seed 0's lines) and DIR/irnn_trained.png: the adding IRNN at initialisation and
after training (the run in --irnn-run, default: trained here with configs/adding_irnn_150.toml).

With --lstm-run (a finished run of configs/adding_lstm_400.toml at T = 200, e.g. from
``experiments/adding.py``; it takes ~12,000 steps, too long to train here): DIR/lstm.md and
DIR/lstm.png, the constant error carousel made visible: ||dDIV/dh(t)|| and ||dDIV/dc(t)|| of the LSTM
at initialisation (forget-gate bias 0 and 1, rates over the seeds) and of the trained one, beside the
tanh (rho = 1) and IRNN lines at initialisation. --lstm-only skips everything else.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from bptt_jax.command import gradflow, runner
from bptt_jax.command.config import load_config
from bptt_jax.command.study import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RHOS = (0.5, 0.9, 1.0, 1.1, 1.5)
T = 200


def profiles(config: str, sets: list[str], from_dir=None) -> dict[str, np.ndarray]:
    """Every line of ``gradflow.gradient_flow`` for one network (the LSTM's c(t) lines included)."""
    cfg = load_config(ROOT / config, sets)
    task, spec, optimizer = runner.build(cfg)
    if from_dir is None:
        params = runner.initial_state(cfg, spec, optimizer).params
    else:
        params = runner.load_run(from_dir)[3]
    return gradflow.gradient_flow(params, spec, task.train_batch(0))


def profile(config: str, sets: list[str], from_dir=None) -> np.ndarray:
    return profiles(config, sets, from_dir)["layer 1 forward"]


def _ratio(x: float) -> str:
    return "0 (underflow)" if x == 0 else f"{x:.3g}"


def lstm_part(run_dir: Path, seeds: list[int], out: Path, *, t_len: int = T, extra: tuple[str, ...] = ()) -> str:
    """The LSTM's h(t) and c(t) lines, untrained (forget bias 0 and 1) and trained; returns lstm.md."""
    base = [f"data.adding_length={t_len}", "data.batch_size=64", *extra]  # extra: smaller nets in the tests
    config = "configs/adding_lstm_400.toml"
    c_key = "layer 1 forward" + gradflow.CELL_SUFFIX
    rows, lines = [], {}
    for fb in (0.0, 1.0):
        rate_h, rate_c, c_far = [], [], []
        for seed in seeds:
            prof = profiles(config, base + [f"model.forget_bias={fb}", f"train.seed={seed}"])
            rate_h.append(gradflow.fit_rate(prof["layer 1 forward"])[0])
            rate_c.append(gradflow.fit_rate(prof[c_key])[0])
            c_far.append(prof[c_key][t_len - 1] / prof[c_key][1])
            if seed == seeds[0]:
                lines[f"LSTM fb {fb:g}, untrained: h(t)"] = prof["layer 1 forward"]
                lines[f"LSTM fb {fb:g}, untrained: c(t)"] = prof[c_key]
        rows.append(
            [f"untrained, forget bias {fb:g}", spread(rate_h), spread(rate_c), _ratio(statistics.median(c_far))]
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    fb_run = load_config(run_dir / "config.toml").model.forget_bias
    trained = profiles(config, base + [f"model.forget_bias={fb_run}"], from_dir=run_dir)
    rh, rc = gradflow.fit_rate(trained["layer 1 forward"])[0], gradflow.fit_rate(trained[c_key])[0]
    label = f"trained ({summary['steps']} steps, test MSE {summary['best_val_loss']:.4f}, forget bias {fb_run:g})"
    rows.append([label, f"{rh:.4f}", f"{rc:.4f}", _ratio(trained[c_key][t_len - 1] / trained[c_key][1])])
    lines["LSTM trained: h(t)"] = trained["layer 1 forward"]
    lines["LSTM trained: c(t)"] = trained[c_key]
    tanh_sets = base + ["model.activation=tanh", "model.init=orthogonal", "model.init_scale=1.0"]
    lines["tanh RNN, W11 = Q (rho 1), untrained"] = profile(
        "configs/adding_tanh_150.toml", tanh_sets + ["train.seed=0"]
    )
    lines["IRNN, untrained"] = profile("configs/adding_irnn_150.toml", base + ["train.seed=0"])
    gradflow.plot(
        lines,
        out / "lstm.png",
        title=f"loss on the last step, T = {t_len}, the adding task's inputs (seed {seeds[0]})",
        rates={k: gradflow.fit_rate(v)[0] for k, v in lines.items()},
    )
    table = markdown_table(
        [
            f"LSTM, T = {t_len}",
            "rate of ||dDIV/dh(t)||",
            "rate of ||dDIV/dc(t)||",
            f"||dDIV/dc|| at distance {t_len - 1} / at 1",
        ],
        rows,
    )
    table += (
        f"\nPer-step factors fitted over the distances before underflow, median [range] over seeds {seeds} "
        f"(untrained); the trained LSTM is {run_dir.name}, its first training batch.\n"
    )
    (out / "lstm.md").write_text(table)
    return table


def spread(values: list[float]) -> str:
    if not all(np.isfinite(values)):
        return "overflow: the forward states exceed float32 (no gradient)"
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--irnn-run", default=None, help="a finished run of configs/adding_irnn_150.toml")
    ap.add_argument("--lstm-run", default=None, help="a finished run of configs/adding_lstm_400.toml at T = 200")
    ap.add_argument("--lstm-only", action="store_true", help="only the LSTM part (needs --lstm-run)")
    ap.add_argument("--out", default="runs/gradflow_study")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.lstm_only and not args.lstm_run:
        ap.error("--lstm-only needs --lstm-run")
    if args.lstm_run:
        print(lstm_part(Path(args.lstm_run), seeds, out))
        if args.lstm_only:
            return
    base = [f"data.adding_length={T}", "data.batch_size=64"]
    lines: dict[str, np.ndarray] = {}
    rows, record = [], {}
    for rho in RHOS:
        rates = {}
        for act in ("identity", "tanh"):
            rates[act] = []
            for seed in seeds:
                sets = base + [
                    f"model.activation={act}",
                    "model.init=orthogonal",
                    f"model.init_scale={rho}",
                    f"train.seed={seed}",
                ]
                norms = profile("configs/adding_tanh_150.toml", sets)
                rates[act].append(gradflow.fit_rate(norms)[0])
                if seed == seeds[0]:
                    lines[f"{act}, rho = {rho}"] = norms
        rows.append(
            [rho, spread(rates["identity"]), spread(rates["tanh"]), f"{statistics.median(rates['tanh']) / rho:.3f}"]
        )
        record[f"rho={rho}"] = rates
    irnn = []
    for seed in seeds:
        norms = profile("configs/adding_irnn_150.toml", base + [f"train.seed={seed}"])
        irnn.append(gradflow.fit_rate(norms)[0])
        if seed == seeds[0]:
            lines["IRNN (relu, W11 = I)"] = norms
    rows.append(["IRNN, W11 = I", "-", spread(irnn) + " (relu)", f"{statistics.median(irnn):.3f}"])
    record["irnn"] = irnn
    table = markdown_table(
        ["rho (W11 = rho Q)", "rate, f1 = identity", "rate, f1 = tanh", "tanh rate / rho (median)"], rows
    )
    table += f"\nPer-step factor of ||dDIV/dh(t)|| fitted over the distances before underflow; T = {T}, batch 64, seeds {seeds}.\n"
    gradflow.plot(lines, out / "gradflow.png", title=f"loss on the last step, T = {T}, 100 units (seed {seeds[0]})")

    run_dir = Path(args.irnn_run) if args.irnn_run else None
    if run_dir is None:
        run_dir = out / "irnn_T150"
        if not (run_dir / "summary.json").exists():
            print(f"training the adding IRNN into {run_dir} (configs/adding_irnn_150.toml)", flush=True)
            runner.run(load_config(ROOT / "configs/adding_irnn_150.toml"), run_dir, progress=False, log=lambda s: None)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    before = profile("configs/adding_irnn_150.toml", [])
    after = profile("configs/adding_irnn_150.toml", [], from_dir=run_dir)
    pair = {"IRNN at initialisation": before, f"IRNN trained (test MSE {summary['best_val_loss']:.4f})": after}
    gradflow.plot(pair, out / "irnn_trained.png", title="adding IRNN, T = 150, before and after training")
    rb, ra = gradflow.fit_rate(before)[0], gradflow.fit_rate(after)[0]
    table += (
        f"\nAdding IRNN at T = 150 (seed 0): rate {rb:.4f} at initialisation, {ra:.4f} after training "
        f"({summary['steps']} steps, best test MSE {summary['best_val_loss']:.4f}); ||dDIV/dh|| at distance 149 "
        f"relative to distance 1: {before[149] / before[1]:.3g} before, {after[149] / after[1]:.3g} after.\n"
    )
    record["irnn_trained"] = {"before": rb, "after": ra, "run": str(run_dir)}
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print(table)


if __name__ == "__main__":
    main()
