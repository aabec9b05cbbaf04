"""The layers' custom VJP (``rnn_states``) of a stack: memory and time of its plans, segments among them.

    python benchmarks/states_memory.py [--quick] [--rounds R] [--out FILE] [--cell elman|gru|lstm ...]

What the NNX / Equinox layers run: ``rnn_states`` of a unidirectional stack of three layers (B 16,
N 16, N1 64, float32, T 256 and 1024; then a bidirectional one, concat merge, T 256) and the gradient of a fixed random cotangent of its output
(``jax.vjp``), for: the default plan, the gates recomputed (gated cells), checkpoint segments of k
steps (k the divisor of T nearest sqrt(T), and 4k), and ``grad="autodiff"`` (``jax.grad`` through
the same scans). Each program compiled once: temp memory from XLA's ``memory_analysis()``; all
timed side by side in one process (round robin, random order, medians); every gradient checked
against the default's first. Reported: temp memory and time, each over the default's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core.vjp import rnn_states  # noqa: E402

SIZES = dict(B=16, N=16, N1=64, L=3)
LENGTHS = (256, 1024)
QUICK = dict(B=2, N=3, N1=4, L=2)
QUICK_LENGTHS = (16,)
BIDIR_LENGTHS = (256,)  # the bidirectional stack's (its segments recompute more: one length is enough)


def _sqrt_divisor(t_len: int) -> int:
    return min((d for d in range(2, t_len) if t_len % d == 0), key=lambda d: abs(d - t_len**0.5))


def contenders(cell: str, sizes: dict, t_len: int) -> dict:
    """{name: rnn_states keywords}."""
    k = _sqrt_divisor(t_len)
    out: dict[str, dict] = {"default": {}}
    if cell != "elman":
        out["gates='recompute'"] = dict(gates="recompute")
    out[f"checkpoint_every={k}"] = dict(checkpoint_every=k)
    if t_len % (4 * k) == 0 and 4 * k < t_len:
        out[f"checkpoint_every={4 * k}"] = dict(checkpoint_every=4 * k)
    out['grad="autodiff"'] = dict(grad="autodiff")
    return out


def bench(cell: str, sizes: dict, t_len: int, rounds: int, bidirectional: bool = False) -> dict:
    """{name: (temp bytes, median s, largest relative difference from the default's gradients)}."""
    b, n, n1, n_layers = sizes["B"], sizes["N"], sizes["N1"], sizes["L"]
    spec = bj.RNNSpec(n, (n1,) * n_layers, 2, cell=cell, bidirectional=bidirectional)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t_len, b, n), jnp.float32)
    ct = jax.random.normal(jax.random.key(2), (t_len, b, spec.merged_size(-1)), jnp.float32)
    compiled, temps, outs = {}, {}, {}
    for name, kw in contenders(cell, sizes, t_len).items():

        def fwd_bwd(p, x, c, kw=kw):
            return jax.vjp(lambda p, x: rnn_states(p, spec, x, **kw), p, x)[1](c)

        compiled[name], _, temps[name], _ = bptt_speed.compile_jax(fwd_bwd, params, xs, ct)
        outs[name] = compiled[name](params, xs, ct)
    errs = {k: bptt_speed.max_rel_err(v, outs["default"]) for k, v in outs.items()}
    runners = {k: (lambda f=f: bptt_speed._block(f(params, xs, ct))) for k, f in compiled.items()}
    med = bptt_speed.round_robin(runners, rounds)
    return {k: (temps[k], med[k], errs[k]) for k in compiled}


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, bptt_speed.CELLS, 7)
    sizes, lengths = (QUICK, QUICK_LENGTHS) if args.quick else (SIZES, LENGTHS)
    lines = gate_blocks.header("rnn_states of a stack: memory and time of its plans", "states_memory.py", argv, rounds)
    lines += [
        f"rnn_states forward + backward (jax.vjp, a random cotangent of the output), {sizes['L']} layers, "
        f"B {sizes['B']}, N {sizes['N']}, N1 {sizes['N1']}, float32. Over the default's: temp memory and time; "
        "diff: largest relative difference of the gradients from the default's.",
        "",
        "| cell | T | contender | temp | temp / default | ms | time / default | diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bidirectional in (False, True):
        for cell in args.cell or bptt_speed.CELLS:
            label = f"{cell} (bidirectional)" if bidirectional else cell
            for t_len in (QUICK_LENGTHS if args.quick else BIDIR_LENGTHS) if bidirectional else lengths:
                rows = bench(cell, sizes, t_len, rounds, bidirectional)
                temp0, time0, _ = rows["default"]
                for name, (temp, sec, err) in rows.items():
                    lines.append(
                        f"| {label} | {t_len} | {name} | {bptt_speed.fmt_bytes(temp)} | {temp / temp0:.2f} | "
                        f"{1e3 * sec:.2f} | {sec / time0:.2f} | {err:.1e} |"
                    )
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
