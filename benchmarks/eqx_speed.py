"""One training step of a small Equinox sequence model: our layer against the Equinox cell scanned.

    python benchmarks/eqx_speed.py [--quick] [--rounds R] [--steps S] [--out FILE] [--cell gru|lstm ...]

The model, Equinox's way (one sequence per call, ``jax.vmap`` over the batch):
``eqx.nn.Embedding`` (V -> N), two recurrent layers, ``eqx.nn.Linear`` readout, softmax
cross-entropy over every step, optax Adam. The recurrent layers are either ``jax.lax.scan`` over
``eqx.nn.GRUCell`` / ``eqx.nn.LSTMCell`` (Equinox ships no RNN layer; this is its documented
pattern), or the same cells switched to the explicit BPTT by
``bptt_jax.layers.equinox.RNN.from_eqx_cell`` (the same weights and the same trainable arrays).
Both steps are one ``jax.jit``-ed pure function of (parameters, optimizer state, batch), so each
compiles to one XLA program whose temp memory is read from ``memory_analysis()``; timing and the
report as ``nnx_speed.py`` (same batches, a fresh random order per round, medians; the loss after
the same steps beside it, equal to float32 rounding when the switch trains as the cell does).
Where the gated cells' compiled kernel builds (the one call's defaults then run it), the one call
also runs with the scans (``recurrence="scan"``, with and without the gates recomputed).
Equinox has no vanilla RNN cell, so there is no Elman row.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402
import nnx_speed  # noqa: E402

from bptt_jax.core.kernels import native_reason  # noqa: E402
from bptt_jax.layers import equinox as beqx  # noqa: E402

OURS, BATCH, LEAN, EQX = (
    "bptt_jax.layers.equinox.RNN, vmapped",
    "bptt_jax.layers.equinox.RNN, one call [B, T, N]",
    "bptt_jax.layers.equinox.RNN, one call, gates='recompute'",
    "lax.scan + Equinox cell, vmapped",
)


class Scanned(eqx.Module):
    """An Equinox cell run over one sequence with ``jax.lax.scan``: [T, N] -> [T, N1]."""

    cell: eqx.Module

    def __call__(self, xs):
        n1 = self.cell.hidden_size
        lstm = isinstance(self.cell, eqx.nn.LSTMCell)
        h0 = (jnp.zeros(n1), jnp.zeros(n1)) if lstm else jnp.zeros(n1)

        def body(h, x):
            h = self.cell(x, h)
            return h, h[0] if lstm else h

        return jax.lax.scan(body, h0, xs)[1]


class Model(eqx.Module):
    embed: eqx.nn.Embedding
    rnn1: eqx.Module
    rnn2: eqx.Module
    out: eqx.nn.Linear

    def __init__(self, cell: str, sizes: dict, *, ours: bool, key, **layer_options):
        v, n, n1 = sizes["V"], sizes["N"], sizes["N1"]
        k = jax.random.split(key, 4)
        make = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[cell]
        cells = [make(n, n1, key=k[1]), make(n1, n1, key=k[2])]  # the same draws for both contenders
        layers = [beqx.RNN.from_eqx_cell(c, **layer_options) if ours else Scanned(c) for c in cells]
        self.embed = eqx.nn.Embedding(v, n, key=k[0])
        self.rnn1, self.rnn2 = layers
        self.out = eqx.nn.Linear(n1, v, key=k[3])

    def __call__(self, ids):  # one sequence [T] -> logits [T, V]
        return jax.vmap(self.out)(self.rnn2(self.rnn1(jax.vmap(self.embed)(ids))))

    def batch(self, ids):  # [B, T] -> logits [B, T, V], the recurrent layers called once on [B, T, N]
        xs = jax.vmap(jax.vmap(self.embed))(ids)
        return jax.vmap(jax.vmap(self.out))(self.rnn2(self.rnn1(xs)))


def contender(cell: str, sizes: dict, ours: bool, batch_call: bool = False, **layer_options):
    """(jitted step(state, ids [B, T], targets [B, T]) -> (state, loss), state); ``batch_call``: the
    model's ``batch`` (our layers called once on the batch) instead of ``jax.vmap`` of the model."""
    model = Model(cell, sizes, ours=ours, key=jax.random.key(0), **layer_options)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.adam(1e-3)

    def step(state, ids, targets):
        params, opt_state = state

        def loss(p):
            m = eqx.combine(p, static)
            logits = m.batch(ids) if batch_call else jax.vmap(m)(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return jax.jit(step, donate_argnums=0), (params, opt.init(params))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per contender per round (default 10, quick 2)")
    ap.add_argument("--cell", action="append", choices=("gru", "lstm"), help="default: both")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    sizes = nnx_speed.QUICK if args.quick else nnx_speed.SHAPE
    rounds = args.rounds or (1 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 10)
    rng = np.random.RandomState(0)
    batches = [
        tuple(jnp.asarray(rng.randint(0, sizes["V"], (sizes["B"], sizes["T"]))) for _ in range(2))
        for _ in range(1 + rounds * steps)
    ]
    lines = [
        f"# An Equinox model's training step: our layer against the cell scanned ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {gate_blocks.cpu_model()} ({platform.machine()}), {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}, equinox {eqx.__version__}; command: "
        f"`python benchmarks/eqx_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`. Model: Embedding "
        f"{sizes['V']} -> {sizes['N']}, two recurrent layers of {sizes['N1']}, Linear readout, Adam, vmapped over "
        f"B = {sizes['B']} sequences of T = {sizes['T']}; {rounds} rounds of {steps} steps per contender after one "
        "warm-up step, a fresh order per round; medians.",
        "",
        "| cell | contender | steps/s | speed-up over Equinox | temp mem | temp / Equinox's | compile s | loss after the steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    k = nnx_speed.segment_length(sizes["T"])
    for cell in args.cell or ["gru", "lstm"]:
        contenders = {
            OURS: contender(cell, sizes, True),
            BATCH: contender(cell, sizes, True, batch_call=True),
            LEAN: contender(cell, sizes, True, batch_call=True, gates="recompute"),
            f"{BATCH}, checkpoint_every={k}": contender(cell, sizes, True, batch_call=True, checkpoint_every=k),
        }
        if native_reason(cell, jnp.float32) is None:  # the defaults run the compiled kernel: the scans beside it
            contenders[f"{BATCH}, recurrence='scan'"] = contender(cell, sizes, True, batch_call=True, recurrence="scan")
            contenders[f"{LEAN}, recurrence='scan'"] = contender(
                cell, sizes, True, batch_call=True, recurrence="scan", gates="recompute"
            )
        contenders[EQX] = contender(cell, sizes, False)
        results = nnx_speed.race(contenders, batches, rounds, steps)
        base_sps, base_temp = results[EQX][0], results[EQX][2]
        lines += [
            f"| {cell} | {name} | {sps:.1f} | {sps / base_sps:.2f}x | {temp / 2**20:.2f} MiB | "
            f"{temp / base_temp:.2f} | {compile_s:.1f} | {loss:.4f} |"
            for name, (sps, compile_s, temp, loss) in results.items()
        ]
    return bptt_speed._report(lines, args.out)  # printed, and written to --out


if __name__ == "__main__":
    main()
