"""Runs a char-LM config's training step (``train_speed.py``'s bptt contender) for a profiler to watch.

    python benchmarks/train_profile.py [--cell elman|gru|lstm] [--rounds R] [--steps S] [--quick]
    perf record -D 8000 -F 2000 -g -o perf.data python benchmarks/train_profile.py --cell lstm --rounds 8
    perf report -i perf.data --no-children --sort sym

Builds the config's model and train step exactly as ``train_speed.py`` does (same batches, no
dropout, a constant learning rate), compiles it with two warm-up steps, then runs ``--rounds``
rounds of ``--steps`` steps and prints each round's steps/s. Nothing is compared here: it is the
workload for a sampling profiler (Linux ``perf``; start its recording after the warm-up, ``-D``
milliseconds, so that compilation is left out), which attributes the step's time to the compiled
kernel's functions (its packed gemm ``tile``, the weight-gradient sums ``tile_tn`` / ``gemm_tn``,
the gate arithmetic in ``LstmSteps::step`` / ``LstmReverseImpl``) and to XLA's own operations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_speed  # noqa: E402

from bptt_jax.command import config, runner  # noqa: E402


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=("elman", "gru", "lstm"), default="lstm", help="the char-LM config's cell")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (default 8)")
    ap.add_argument("--steps", type=int, default=30, help="steps per round (default 30)")
    ap.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps: expected positive ints")
    name = "char_lm.toml" if args.cell == "elman" else f"char_lm_{args.cell}.toml"
    overrides = ["train.output_dropout=0.0", 'optim.schedule="constant"']
    if args.quick:
        overrides += ["model.hidden_sizes=[8, 8]", "data.seq_len=8", "data.batch_size=4"]
    cfg = config.load_config(str(ROOT / "configs" / name), overrides)
    task, _, _ = runner.build(cfg)
    batches = [task.train_batch(i) for i in range(2 + args.steps)]
    train_speed.BATCHES_FOR_COMPILE[:] = batches[:1]
    run, _, _, _ = train_speed.jax_contender(cfg, "bptt")
    run(batches[:2])  # compilation
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        run(batches[2:])
        rates.append(args.steps / (time.perf_counter() - t0))
        print(f"{rates[-1]:.2f} steps/s", flush=True)
    return rates


if __name__ == "__main__":
    main()
