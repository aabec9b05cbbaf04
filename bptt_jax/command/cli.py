"""The ``bptt-jax`` command: run, sample, gradcheck.

bptt-jax run CONFIG [--set section.key=value ...] [--out DIR] [--resume] [--processes N [--port P]]
bptt-jax sample RUN_DIR [--prime TEXT] [--length N] [--temperature X] [--seed S]
bptt-jax gradcheck CONFIG [--set ...] [--tolerance X]
bptt-jax gradflow CONFIG [--set ...] [--out DIR] [--from RUN_DIR [--checkpoint best|last]]
bptt-jax tune CONFIG [--set ...] [--time-budget S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bptt_jax.command.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (the docs' command reference is generated from it)."""
    p = argparse.ArgumentParser(
        prog="bptt-jax", description="Train recurrent networks (Elman, GRU, LSTM) with explicit BPTT in JAX."
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one run from a TOML config")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    r.add_argument("--out", help="output directory (default: the config's output.dir)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.ckpt; without one (a run stopped before its first checkpoint, or none yet) start from step 0",
    )
    r.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="run as N local processes over 127.0.0.1 (each with the CPU devices XLA_FLAGS gives it)",
    )
    r.add_argument("--port", type=int, help="with --processes: the coordinator's port (default: a free one)")
    s = sub.add_parser("sample", help="generate text from a run's best checkpoint")
    s.add_argument("run_dir")
    s.add_argument("--prime", default=None, help="text to start from (default: a newline)")
    s.add_argument("--length", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("gradcheck", help="compare the explicit BPTT with jax.grad on one batch")
    g.add_argument("config")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    g.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference allowed (float32)")
    f = sub.add_parser(
        "gradflow",
        help="plot ||dDIV/dh(t)|| against the distance from a loss on one step (vanishing / exploding gradients)",
    )
    f.add_argument("config")
    f.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    f.add_argument("--out", help="output directory (default: OUTPUT_DIR/gradflow, or RUN_DIR/gradflow with --from)")
    f.add_argument(
        "--from", dest="from_dir", metavar="RUN_DIR", help="take the weights from this run (same network and task)"
    )
    f.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="with --from: best.ckpt (default) or last.ckpt"
    )
    t = sub.add_parser(
        "tune",
        help="measure the explicit BPTT's plans for a config's shapes on this machine and cache the fastest",
    )
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--time-budget", type=float, default=60.0, metavar="S", help="seconds to spend (default 60)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "sample":
            return _sample(args)
        if args.command == "gradflow":
            return _gradflow(args)
        if args.command == "tune":
            return _tune(args)
        return _gradcheck(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user-facing errors from the library, printed without a traceback
        from bptt_jax.command.runner import RunError
        from bptt_jax.training.checkpoint import CheckpointError

        if isinstance(e, (RunError, CheckpointError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


def _run(args) -> int:
    from bptt_jax.command import runner

    cfg = load_config(args.config, args.set)
    out = args.out or cfg.output.dir
    if args.port is not None and args.processes is None:
        print("error: --port needs --processes", file=sys.stderr)
        return 2
    if args.processes is not None and args.processes != 1:
        from bptt_jax.command import launch

        return launch.launch(args.config, args.set, out, args.processes, resume=args.resume, port=args.port)
    summary = runner.run(cfg, out, resume=args.resume)
    keys = ("task", "steps", "seconds", "stopped_by", "best_val_loss", "best_val_bits_per_char", "best_val_accuracy")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return runner.EXIT_SIGNAL if summary.get("stopped_by") == "signal" else 0


def _sample(args) -> int:
    from bptt_jax.command import report, runner

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").exists():
        print(f"error: {run_dir} is not a run directory (no config.toml)", file=sys.stderr)
        return 1
    cfg, task, spec, params, _ = runner.load_run(run_dir)
    if task.name != "text":
        print(f"error: sampling needs a text run, {run_dir} trained task {task.name!r}", file=sys.stderr)
        return 1
    if args.length < 1 or args.temperature <= 0:
        print("error: --length must be >= 1 and --temperature > 0", file=sys.stderr)
        return 1
    print(
        report.sample_text(
            params, spec, task.vocab, prime=args.prime, length=args.length, temperature=args.temperature, seed=args.seed
        )
    )
    return 0


def gradcheck(cfg, tolerance: float = 1e-4) -> dict:
    """Largest relative difference between the explicit BPTT and jax.grad on one batch of cfg's data."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bptt_jax.command import runner
    from bptt_jax.core.gradient import bptt, loss

    task, spec, optimizer = runner.build(cfg)
    params = runner.initial_state(cfg, spec, optimizer).params
    batch = task.train_batch(0)
    xs = jnp.asarray(batch.xs)
    kw = dict(weights=batch.weights, lengths=batch.lengths)
    value, grads, _ = bptt(params, spec, xs, batch.targets, **kw)
    want_value, want = jax.value_and_grad(lambda p: loss(p, spec, xs, batch.targets, **kw))(params)
    worst = abs(float(value) - float(want_value)) / max(abs(float(want_value)), 1e-30)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        scale = float(jnp.max(jnp.abs(b)))
        diff = float(jnp.max(jnp.abs(a - b)))
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf))
    return {"max_relative_difference": worst, "tolerance": tolerance, "ok": worst <= tolerance}


def _gradcheck(args) -> int:
    cfg = load_config(args.config, args.set)
    result = gradcheck(cfg, args.tolerance)
    print(
        f"largest relative difference, explicit BPTT vs jax.grad: {result['max_relative_difference']:.3e} "
        f"(tolerance {args.tolerance:.1e}): {'OK' if result['ok'] else 'FAIL'}"
    )
    return 0 if result["ok"] else 1


def _tune(args) -> int:
    from bptt_jax.command import runner
    from bptt_jax.core import plancache

    if args.time_budget < 0:
        print("error: --time-budget must be >= 0", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    chosen = runner.tune_plan(cfg, time_budget=args.time_budget)
    gates = "store" if chosen.store else "recompute"
    print(
        f"plan: block_size={chosen.block} gates={gates} unroll={chosen.unroll} recurrence={chosen.recurrence} "
        f"(cached in {plancache.cache_dir() / plancache.FILE})"
    )
    return 0


def _gradflow(args) -> int:
    from bptt_jax.command import gradflow

    cfg = load_config(args.config, args.set)
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.from_dir if args.from_dir else cfg.output.dir) / "gradflow"
    gradflow.run(cfg, out, from_dir=args.from_dir, checkpoint=args.checkpoint)
    print(f"wrote {out / 'gradflow.png'} and {out / 'gradflow.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
