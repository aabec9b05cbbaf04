"""Two other formulations of the LSTM's step against the library's, in the whole ``bptt`` call.

    python benchmarks/lstm_forms.py [--quick] [--rounds R] [--out FILE]

Issue 35's first lever: a step that XLA fuses into fewer, larger operations. Two forms, each swapped
into ``bptt_jax.core.cells.lstm`` for the time it is traced (and restored after):

  fused gates      the four gate activations as ONE elementwise operation over [B, 4 N1]:
                   sigma(x) = (1 + tanh(x / 2)) / 2, so every column is a * tanh(s x) + b with
                   (s, a, b) = (1/2, 1/2, 1/2) for i, f, o and (1, 1, 0) for g; the gate cache is that
                   array (no join of four slices). The same function in the forward step and in the
                   reverse pass's recomputation.
  in-loop coefficients  the reverse loop computes its step coefficients (o (1 - tanh^2 c), ...) from
                   the gates and c(t), c(t-1) inside the loop, instead of precomputing five [C, B, N1]
                   arrays over the block before it (less memory traffic, the same arithmetic).

The default ``bptt`` call (plan cache off: the rules' plan) with ``gates="store"`` and with
``gates="recompute"``, one layer + softmax readout, float32, at the gated benchmark shapes; each
form's loss and gradients checked against the library's (1e-5 relative) before timing; all compiled
programs timed side by side in one process (round robin, a fresh random order per round, medians).
Reported: each form's time over the library's (below 1: the form is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402
import xla_options  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import gradient  # noqa: E402
from bptt_jax.core.cells import lstm  # noqa: E402
from bptt_jax.core.precision import accumulation, is_half, mm, zeros_acc  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]


def all_gates(g_all):
    """[i | f | g | o] from G(t) [..., 4 N1] in one elementwise operation (one tanh per element)."""
    n1 = g_all.shape[-1] // 4
    col = jnp.arange(4 * n1)
    is_g = (col >= 2 * n1) & (col < 3 * n1)
    half = jnp.where(is_g, 1.0, 0.5).astype(g_all.dtype)
    return jnp.tanh(g_all * half) * half + jnp.where(is_g, 0.0, 0.5).astype(g_all.dtype)


def fused_gates(g_all):
    a = all_gates(g_all)
    n1 = a.shape[-1] // 4
    return tuple(a[..., k * n1 : (k + 1) * n1] for k in range(4))


def fused_recur_cache(p, activation, s_tm1, a_t):
    n1 = s_tm1.shape[-1] // 2
    a = all_gates(a_t + mm(s_tm1[:, :n1], p.wh) + p.bh)
    i, f, g, o = (a[:, k * n1 : (k + 1) * n1] for k in range(4))
    c = f * s_tm1[:, n1:] + i * g
    return jnp.concatenate([o * jnp.tanh(c), c], axis=-1).astype(s_tm1.dtype), a.astype(s_tm1.dtype)


def in_loop_reverse(p, activation, xs, s_tm1s, ss, dhs_above, valid, ds_init, *, with_norms=True, unroll=1, cache=None):
    """``lstm.reverse`` with the step coefficients formed inside the loop from the gates and c."""
    n1 = ss.shape[-1] // 2
    acc = accumulation(ss.dtype)
    if cache is None:
        cache = jnp.concatenate(lstm._gates(lstm.project(p, xs) + mm(s_tm1s[..., :n1], p.wh) + p.bh), axis=-1)
    wh_t = p.wh.T

    def body(carry, inp):
        above_t, g_t, sm1_t, s_t, valid_t = inp
        i, f, g, o = (g_t.astype(acc)[:, k * n1 : (k + 1) * n1] for k in range(4))
        c_tm1, c = sm1_t[:, n1:].astype(acc), s_t[:, n1:].astype(acc)
        if is_half(ss.dtype):
            c = f * c_tm1 + i * g
        tc = jnp.tanh(c)
        dh = above_t + carry[:, :n1]
        dc = carry[:, n1:]
        dct = dc + dh * (o * (1.0 - tc * tc))
        parts = [dct * (g * i * (1.0 - i)), dct * (c_tm1 * f * (1.0 - f)), dct * (i * (1.0 - g * g))]
        dg_all = jnp.concatenate([*parts, dh * (tc * o * (1.0 - o))], axis=-1)
        new = jnp.concatenate([mm(dg_all, wh_t), dct * f], axis=-1)
        if valid_t is not None:
            dg_all = jnp.where(valid_t[:, None], dg_all, 0.0)
            new = jnp.where(valid_t[:, None], new, jnp.concatenate([dh, dc], axis=-1))
        norm = None
        if with_norms:
            dc_t = dct if valid_t is None else jnp.where(valid_t[:, None], dct, dc)
            norm = jnp.stack([jnp.sqrt(jnp.sum(dh * dh, axis=-1)), jnp.sqrt(jnp.sum(dc_t * dc_t, axis=-1))], -1)
        return new, (dg_all, norm)

    init = zeros_acc(s_tm1s[0]) if ds_init is None else ds_init
    inputs = (dhs_above, cache, s_tm1s, ss, valid)
    ds_m1, (dgs, norms) = lax.scan(body, init, inputs, reverse=True, unroll=unroll)
    return dgs, dgs, ds_m1, norms


FORMS = {
    "library": {},
    "fused gates": {"_gates": fused_gates, "recur_cache": fused_recur_cache},
    "in-loop coefficients": {"reverse": in_loop_reverse},
}


@contextlib.contextmanager
def swapped(functions: dict):
    """``functions`` in place of the LSTM module's own while traced; the module as it was after.
    JAX's trace caches are cleared on the way in and out: ``bptt``'s inner jitted function would
    otherwise reuse the trace of the form before (all forms would compile the same program)."""
    saved = {name: getattr(lstm, name) for name in functions}
    jax.clear_caches()
    gradient._compiled.cache_clear()
    for name, fn in functions.items():
        setattr(lstm, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(lstm, name, fn)
        jax.clear_caches()
        gradient._compiled.cache_clear()


def bench(shape, rounds: int) -> dict:
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell="lstm")
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    args = (params, xs, targets)
    runners, ref, programs = {}, {}, {}
    for gates in ("store", "recompute"):

        def f(p, x, d, gates=gates):
            return bj.bptt(p, spec, x, d, gates=gates, recurrence="scan")[:2]

        for name, functions in FORMS.items():
            with xla_options.rules_only(), swapped(functions):
                compiled = jax.jit(f).lower(*args).compile()
            text = compiled.as_text()
            if text in programs.values():  # a form that compiled to another's program measures nothing
                raise AssertionError(f"{shape} {name} gates={gates}: the same program as another form")
            programs[(name, gates)] = text
            leaves = jax.tree_util.tree_leaves(compiled(*args))
            ref.setdefault(gates, leaves)
            err = max(xla_options._rel(a, r) for a, r in zip(leaves, ref[gates]))
            if err > 1e-5:
                raise AssertionError(f"{shape} {name} gates={gates}: differs from the library's by {err:.1e}")
            runners[(name, gates)] = (lambda c: lambda: bptt_speed._block(c(*args)))(compiled)
    return bptt_speed.round_robin(runners, rounds)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    rounds = 2 if args.quick else args.rounds
    lines = gate_blocks.header("The LSTM's step in other forms", "lstm_forms.py", argv, rounds)
    forms = [name for name in FORMS if name != "library"]
    lines += [
        "Each form's median time of the default `bptt` call over the library's form (below 1: faster);"
        " gradients checked equal to the library's to 1e-5 relative first.",
        "",
        "| T, B, N, N1, M | " + " | ".join(f"{f}, gates={g}" for f in forms for g in ("store", "recompute")) + " |",
        "|---" * (2 * len(forms) + 1) + "|",
    ]
    for shape in shapes:
        med = bench(shape, rounds)
        ratios = [med[(f, g)] / med[("library", g)] for f in forms for g in ("store", "recompute")]
        lines.append(f"| {shape} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print(f"{shape} done", file=sys.stderr)
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
