"""Compiled temp memory of the explicit BPTT with checkpoint segments, one level and nested.

    python benchmarks/segment_memory.py [--t 40000] [--out FILE]

One layer (B 16, N 64, N1 128, float32) of each cell, unidirectional and bidirectional: the
compiled temp memory (XLA's ``memory_analysis()``, nothing is run) of
- ``bptt`` (readout M 64, softmax + cross-entropy) with ``checkpoint_every`` k = T/100 and the
  nested levels (T/10, T/1000);
- the training step the layers run: ``jax.grad`` of sum(rnn_states(...) * C) with respect to the
  weights and X, C a fixed array (an argument, like X), for the default plan, the same k and the
  nested levels.
Beside each, the sizes of X and of one outer segment's slice of X, to read the figures against.
Compare two versions of the code by running the script on each (the figures are deterministic).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gate_blocks  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import budget  # noqa: E402
from bptt_jax.core.vjp import rnn_states  # noqa: E402

B, N, N1, M = 16, 64, 128, 64


def temps(cell: str, bidirectional: bool, t_len: int, every) -> tuple[int, int]:
    """(bptt's temp bytes, the layer's training step's temp bytes) for ``checkpoint_every=every``."""
    spec = bj.RNNSpec(N, (N1,), M, cell=cell, bidirectional=bidirectional)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.ShapeDtypeStruct((t_len, B, N), jnp.float32)
    targets = jax.ShapeDtypeStruct((t_len, B), jnp.int32)
    probe = jax.ShapeDtypeStruct((t_len, B, spec.merged_size(0)), jnp.float32)
    one = jax.jit(lambda p, x, t: bj.bptt(p, spec, x, t, checkpoint_every=every)[:2])
    m_bptt = budget.temp_bytes(one.lower(params, xs, targets).compile())

    def step(p, x, c):
        return jax.grad(lambda a, b: jnp.sum(rnn_states(a, spec, b, checkpoint_every=every) * c), argnums=(0, 1))(p, x)

    m_step = budget.temp_bytes(jax.jit(step).lower(params, xs, probe).compile())
    return m_bptt, m_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t", type=int, default=40_000, help="T (a multiple of 1000)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t_len = args.t
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    lines = [
        "# Temp memory of the explicit BPTT with checkpoint segments",
        "",
        f"Machine: {gate_blocks.cpu_model()}, jax {jax.__version__}, {jax.default_backend()}; command: "
        f"`python benchmarks/segment_memory.py --t {t_len}`. One layer, B {B}, N {N}, N1 {N1}, M {M}, float32; "
        f"X is {mib(t_len * B * N * 4)}, one {t_len // 10}-step slice of it {mib(t_len // 10 * B * N * 4)}. "
        "Compiled temp memory (XLA's memory analysis); nothing run.",
        "",
        "| cell | directions | checkpoint_every | bptt | the layer's training step (rnn_states) |",
        "|---|---|---|---|---|",
    ]
    for cell in ("elman", "gru", "lstm"):
        for bidirectional in (False, True):
            for every in (None, t_len // 100, (t_len // 10, t_len // 1000)):
                m_bptt, m_step = temps(cell, bidirectional, t_len, every)
                row = f"| {cell} | {2 if bidirectional else 1} | {every} | {mib(m_bptt)} | {mib(m_step)} |"
                print(row, flush=True)
                lines.append(row)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
