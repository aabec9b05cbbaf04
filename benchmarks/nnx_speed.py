"""One training step of a small Flax NNX sequence model: our layer against nnx.RNN with the Flax cell.

    python benchmarks/nnx_speed.py [--quick] [--rounds R] [--steps S] [--out FILE] [--cell elman|gru|lstm ...]

The model: ``nnx.Embed`` (V -> N), two recurrent layers, ``nnx.Linear`` readout, softmax
cross-entropy over every step, ``nnx.Optimizer(adam)``. The recurrent layers are either
``nnx.RNN`` over ``nnx.SimpleCell`` / ``nnx.GRUCell`` / ``nnx.OptimizedLSTMCell``, or the same
cells switched to the explicit BPTT by ``bptt_jax.layers.nnx.RNN.from_flax_cell`` (the same
weights and the same trainable parameters: Flax's one bias per gate). The step is the functional
NNX pattern (``nnx.split`` once, a ``jax.jit``-ed pure step over the state), so both contenders
compile to one XLA program whose temp memory is read from ``memory_analysis()``. Both read the same
batches in one process, a fresh random order each round; steps/s is the median over rounds, and the
loss after the same steps is reported beside it: a switched model trains as Flax's, so the two
agree to float32 rounding. Our layer runs with its defaults, with the gated cells' gates
recomputed, with checkpoint segments, under a memory budget (``max_memory`` of each layer's own
forward + backward program: the plan the layer picks to fit it), with the scans where the defaults
run the cells' compiled kernel (``recurrence="scan"``, for the gated cells with and without the
gates recomputed: the defaults before the kernel was the rule), and tuned (each layer's ``tune``
on its own input first, in a plan cache of its own: a temporary ``BPTT_JAX_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gate_blocks  # noqa: E402

from bptt_jax.core.kernels import resolve  # noqa: E402
from bptt_jax.layers import nnx as bnnx  # noqa: E402

SHAPE = dict(T=128, B=32, V=64, N=64, N1=256)  # T * B * N1 = 2^20
QUICK = dict(T=8, B=4, V=11, N=5, N1=6)


class Model(nnx.Module):
    def __init__(self, cell, sizes, *, flax_cells: bool, rngs, **layer_options):
        v, n, n1 = sizes["V"], sizes["N"], sizes["N1"]
        self.embed = nnx.Embed(v, n, rngs=rngs)
        make = {"elman": nnx.SimpleCell, "gru": nnx.GRUCell, "lstm": nnx.OptimizedLSTMCell}[cell]
        flax = [make(n, n1, rngs=rngs), make(n1, n1, rngs=rngs)]  # the same draws for both contenders
        if flax_cells:
            self.rnn1, self.rnn2 = (nnx.RNN(c) for c in flax)
        else:  # the one-line switch
            self.rnn1, self.rnn2 = (bnnx.RNN.from_flax_cell(c, **layer_options) for c in flax)
        self.out = nnx.Linear(n1, v, rngs=rngs)

    def __call__(self, ids):
        return self.out(self.rnn2(self.rnn1(self.embed(ids))))


def contender(cell, sizes, flax_cells, prepare=None, **layer_options):
    model = Model(cell, sizes, flax_cells=flax_cells, rngs=nnx.Rngs(0), **layer_options)
    if prepare is not None:
        prepare(model)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def step(state, ids, targets):
        model, opt = nnx.merge(graphdef, state)

        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(ids), targets).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), value

    return jax.jit(step, donate_argnums=0), state


OURS, FLAX = "bptt_jax.layers.nnx.RNN", "nnx.RNN + Flax cell"
LEAN = "bptt_jax.layers.nnx.RNN, gates='recompute'"  # the gated cells' lean layout (rnn_states' gates)
SCANS = "bptt_jax.layers.nnx.RNN, recurrence='scan'"


def tune_layers(ids, seconds: float):
    """``prepare`` for the tuned contender: each recurrent layer's ``tune`` on its own input (the
    embedded batch, then the first layer's output), ``seconds`` each."""

    def prepare(model):
        x1 = model.embed(ids)
        model.rnn1.tune(x1, time_budget=seconds, progress=False)
        model.rnn2.tune(model.rnn1(x1), time_budget=seconds, progress=False)

    return prepare


def segment_length(t_len: int) -> int:
    """k for the segments contender: the largest divisor of T not above sqrt(T) (at least 2 where T allows)."""
    return max(d for d in range(1, max(int(t_len**0.5), 2) + 1) if t_len % d == 0)


def race(contenders: dict, batches, rounds: int, steps: int) -> dict:
    """{name: (steps/s, compile s, temp bytes, loss after the steps)} for contenders {name: (jitted
    step(state, ids, targets) -> (state, loss), state)}: each compiled (temp memory from
    ``memory_analysis()``), warmed up on the first batch, then ``rounds`` rounds of ``steps`` steps
    each on the same batches, a fresh random order per round; steps/s from the median round."""
    runs, info = {}, {}
    for name, (step, state) in contenders.items():
        t0 = time.perf_counter()
        compiled = step.lower(state, *batches[0]).compile()
        mem = compiled.memory_analysis()
        info[name] = (time.perf_counter() - t0, getattr(mem, "temp_size_in_bytes", float("nan")))
        state, value = step(state, *batches[0])  # warm-up (the same first batch for every contender)
        runs[name] = {"step": step, "state": state, "loss": value, "times": []}
    order = list(runs)
    shuffle = random.Random(0)
    for r in range(rounds):
        shuffle.shuffle(order)
        chunk = batches[1 + r * steps : 1 + (r + 1) * steps]
        for name in order:
            run = runs[name]
            t0 = time.perf_counter()
            for ids, targets in chunk:
                run["state"], run["loss"] = run["step"](run["state"], ids, targets)
            jax.block_until_ready(run["loss"])
            run["times"].append(time.perf_counter() - t0)
    return {
        name: (steps / statistics.median(run["times"]), *info[name], float(run["loss"])) for name, run in runs.items()
    }


def table_rows(cell: str, results: dict, theirs: str) -> list[str]:
    """The report's rows of one cell: steps/s and temp memory, each also over ``theirs``' (the
    framework's own layer), compile s, the loss after the steps."""
    base_sps, base_temp = results[theirs][0], results[theirs][2]
    return [
        f"| {cell} | {name} | {sps:.1f} | {sps / base_sps:.2f}x | {temp / 2**20:.2f} MiB | "
        f"{temp / base_temp:.2f} | {compile_s:.1f} | {loss:.4f} |"
        for name, (sps, compile_s, temp, loss) in results.items()
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per contender per round (default 10, quick 2)")
    ap.add_argument("--cell", action="append", choices=("elman", "gru", "lstm"), help="default: all three")
    ap.add_argument("--tune-budget", type=float, default=None, help="tune's seconds per layer (default 30, quick 0.5)")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else SHAPE
    if args.tune_budget is None:
        args.tune_budget = 0.5 if args.quick else 30.0
    rounds = args.rounds or (1 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 10)
    cells = args.cell or ["elman", "gru", "lstm"]
    rng = np.random.RandomState(0)
    total = 1 + rounds * steps
    batches = [
        tuple(jnp.asarray(rng.randint(0, sizes["V"], (sizes["B"], sizes["T"]))) for _ in range(2)) for _ in range(total)
    ]
    lines = [
        f"# A Flax NNX model's training step: our layer against nnx.RNN ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {gate_blocks.cpu_model()} ({platform.machine()}), {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, flax {__import__('flax').__version__}; command: "
        f"`python benchmarks/nnx_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`. Model: Embed "
        f"{sizes['V']} -> {sizes['N']}, two recurrent layers of {sizes['N1']}, Linear readout, Adam; batch "
        f"[B, T] = [{sizes['B']}, {sizes['T']}] (T * B * N1 = {sizes['T'] * sizes['B'] * sizes['N1']:,}); "
        f"{rounds} rounds of {steps} steps per contender after one warm-up step, a fresh order per round; "
        "medians.",
        "",
        "| cell | contender | steps/s | over Flax's steps/s | temp mem | temp / Flax's | compile s | loss after the steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bptt-jax-nnx-speed-") as cache:
        saved = os.environ.get("BPTT_JAX_CACHE_DIR")
        os.environ["BPTT_JAX_CACHE_DIR"] = cache  # tune's entries go here, never to the user's cache
        try:
            report = _run(args, cells, sizes, batches, rounds, steps, lines)
        finally:
            if saved is None:
                os.environ.pop("BPTT_JAX_CACHE_DIR", None)
            else:
                os.environ["BPTT_JAX_CACHE_DIR"] = saved
    return report


def _run(args, cells, sizes, batches, rounds, steps, lines) -> str:
    for cell in cells:
        contenders = {OURS: contender(cell, sizes, False)}
        # tuned: each layer's plan measured by its tune (the layers fix unroll=1, the rules' value on a
        # CPU, so that their cache key is not the default contender's and only they read the entries)
        tuned = contender(cell, sizes, False, prepare=tune_layers(batches[0][0], args.tune_budget), unroll=1)
        contenders[f"{OURS}, tuned ({args.tune_budget:g} s per layer)"] = tuned
        if cell != "elman":  # the Elman cell has no gates to recompute
            contenders[LEAN] = contender(cell, sizes, False, gates="recompute")
        if resolve("auto", (sizes["N1"],), jnp.float32, cell=cell) == "native":  # the defaults run the
            contenders[SCANS] = contender(cell, sizes, False, recurrence="scan")  # compiled kernel: the scans beside it
            if cell != "elman":
                contenders[f"{SCANS}, gates='recompute'"] = contender(
                    cell, sizes, False, recurrence="scan", gates="recompute"
                )
        k = segment_length(sizes["T"])
        contenders[f"{OURS}, checkpoint_every={k}"] = contender(cell, sizes, False, checkpoint_every=k)
        budget = "8MiB" if not args.quick else "64KiB"  # each layer's forward + backward program
        contenders[f"{OURS}, max_memory={budget}"] = contender(cell, sizes, False, max_memory=budget)
        contenders[FLAX] = contender(cell, sizes, True)
        lines += table_rows(cell, race(contenders, batches, rounds, steps), FLAX)
        if args.out:  # what is measured so far
            Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
