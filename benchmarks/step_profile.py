"""Where the time of one recurrent layer goes: per step, the recurrent matmul, the gate math and the
loop's own cost, forward and reverse, beside PyTorch's fused layer.

    python benchmarks/step_profile.py [--quick] [--rounds R] [--out FILE] [--cell elman|gru|lstm ...]

For each cell at the gated benchmark shapes (one layer, float32, ``bptt_speed.GATED_SHAPES``), side
by side in one process (round robin, a fresh random order each round, medians):

  layer fwd+bwd    ``jax.vjp`` of ``bptt_jax.rnn_states`` (the custom VJP: the explicit BPTT) with a
                   random cotangent of the states: one layer's forward and backward, no readout;
  torch fwd+bwd    PyTorch's ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (oneDNN's fused layer on the CPU),
                   forward and ``backward`` of the same cotangent, eager (where torch imports);
  forward loop     the library's forward scan (``forward._unroll_whole``, the rules' gates setting),
                   less its hoisted input projection, timed alone;
  reverse loop     the cell's reverse recursion (``cell.reverse``) with the forward's stored states
                   (and gates where the rules store them);
  bulk matmuls     the hoisted ones: input projection, weight gradients, dX;
  and three stripped scans over the same T that isolate a step's parts:
  loop only        ``s <- s + A(t)`` stored each step: the while loop, slicing A(t), storing the state;
  + matmul         ``s <- (A(t) + h(t-1) Wh)[:, :W]``: the above plus the recurrent matmul;
  reverse matmul   ``dh <- (dG(t) * k(t)) Wh^T``, dG stored: the reverse loop's matmul, its loop.

Then, for the LSTM, the reverse loop's matmul dG(t) Wh^T in three forms (Wh^T made once; contracted
with Wh directly; one matmul per gate block, summed) beside the forward's h Wh, each scanned over T.

Per step: matmul = (+ matmul) - (loop only); gate math = (forward loop) - (+ matmul). XLA's compiled
program of the layer's fwd+bwd is also read: the operations (thunks) that run in each innermost
while loop's body per step, and how many of them are matmuls. Machines differ (CPU model, vector
width, caches): the model name is printed with every table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import cells, forward, plan  # noqa: E402
from bptt_jax.core.vjp import rnn_states  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]
TORCH = {"elman": "RNN", "gru": "GRU", "lstm": "LSTM"}
SKIP = {"parameter", "get-tuple-element", "constant", "tuple", "bitcast"}


def loop_bodies(hlo: str) -> list[tuple[int, int]]:
    """(operations, matmuls) per step of each innermost while loop in a compiled program's text: the
    instructions of the body computation that run (not parameters, tuple plumbing, constants,
    bitcasts or the loop counter's scalar ops)."""
    comps, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name, lines = m.group(1), []
        elif line.startswith("}") and name:
            comps[name] = lines
            name = None
        elif name:
            lines.append(line)
    bodies = [m.group(1) for m in re.finditer(r"body=%?([\w.\-]+)", hlo)]
    out = []
    for body in bodies:
        ins = comps.get(body, [])
        if any(" while(" in x for x in ins):
            continue  # an outer loop (time blocks); its inner loop is listed on its own
        ops = dots = 0
        for x in ins:
            m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\S+) (\S+?)\(", x)
            if not m or m.group(2) in SKIP or m.group(1).startswith("s32[]"):
                continue
            ops += 1
            dots += m.group(2) in ("dot", "custom-call") or "kind=kCustom" in x  # XLA:CPU's library matmuls
        out.append((ops, dots))
    return out


def _torch_layer(cell, spec, params, xs, ct, threads):
    """(run, states) of PyTorch's layer forward + backward of the cotangent ct, or None."""
    try:
        import torch
    except Exception:
        return None
    from bptt_jax.layers.torch import to_torch_state_dict

    torch.set_num_threads(threads)
    n1 = spec.hidden_sizes[0]
    kw = {"nonlinearity": spec.activation} if cell == "elman" else {}
    rnn = getattr(torch.nn, TORCH[cell])(spec.input_size, n1, **kw)
    sd = {k[len("rnn.") :]: torch.from_numpy(v) for k, v in to_torch_state_dict(params, spec).items() if "rnn" in k}
    rnn.load_state_dict(sd)
    x = torch.from_numpy(np.array(xs)).requires_grad_(True)
    g = torch.from_numpy(np.array(ct))

    def run():
        for p in rnn.parameters():
            p.grad = None
        x.grad = None
        out, _ = rnn(x)
        out.backward(g)
        return out

    return run, lambda: run().detach().numpy()


def bench(cell: str, shape, rounds: int, threads: int) -> dict:
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    layer, act = params.layers[0], spec.activation
    mod = cells.of(layer)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    ct = jax.random.normal(jax.random.key(2), (t, b, n1), jnp.float32)
    store = plan.resolve(plan.Options(), spec, t, b, jnp.float32, use_cache=False).store
    w = mod.state_width(n1)
    s0 = jnp.zeros((b, w), jnp.float32)

    def layer_vjp(p, xs, ct):
        states, pull = jax.vjp(lambda p, xs: rnn_states(p, spec, xs, recurrence="scan"), p, xs)
        return states, pull(ct)

    def fwd_loop(layer, xs, s0):
        return forward._unroll_whole(layer, act, xs, s0, None, 1, "scan", store)

    us = mod.project(layer, xs)  # [T, B, G N1]
    out = forward._unroll_whole(layer, act, xs, s0, None, 1, "scan", store)
    ss, cache = out if store else (out, None)
    s_tm1s = jnp.concatenate([s0[None], ss[:-1]], axis=0)
    dhs = ct

    def rev_loop(layer, xs, s_tm1s, ss, dhs, cache):
        return mod.reverse(layer, act, xs, s_tm1s, ss, dhs, None, None, with_norms=False, unroll=1, cache=cache)

    g_all = us.shape[-1]
    das = jax.random.normal(jax.random.key(4), (t, b, g_all), jnp.float32)

    def bulk(layer, xs, s_tm1s, das):
        return mod.project(layer, xs), mod.weight_grads(layer, xs, s_tm1s, das, das), mod.input_grad(layer, das)

    def loop_only(us, s0):
        return lax.scan(lambda s, u: (s + u[:, :w], s + u[:, :w]), s0, us)

    wh = layer.w11 if cell == "elman" else layer.wh

    def loop_matmul(us, s0, wh):
        def body(s, u):
            new = (u + mod.hidden(s) @ wh)[:, :w] if w <= g_all else u + mod.hidden(s) @ wh
            return new, new

        return lax.scan(body, s0, us)

    k = jax.random.normal(jax.random.key(5), (t, b, g_all), jnp.float32)

    def rev_matmul(k, wh):
        reps = g_all // n1

        def body(dh, k_t):
            dg = jnp.tile(dh, (1, reps)) * k_t
            return dg @ wh.T, dg

        return lax.scan(body, jnp.ones((b, n1), jnp.float32), k, reverse=True)

    jobs = {
        "layer fwd+bwd": (layer_vjp, (params, xs, ct)),
        "forward loop (with projection)": (fwd_loop, (layer, xs, s0)),
        "reverse loop": (rev_loop, (layer, xs, s_tm1s, ss, dhs, cache)),
        "bulk matmuls": (bulk, (layer, xs, s_tm1s, das)),
        "projection": (mod.project, (layer, xs)),
        "loop only": (loop_only, (us, s0)),
        "+ matmul": (loop_matmul, (us, s0, wh)),
        "reverse matmul": (rev_matmul, (k, wh)),
    }
    runners, ops = {}, {}
    for name, (fn, args) in jobs.items():
        compiled, _, _, _ = bptt_speed.compile_jax(fn, *args)
        runners[name] = (lambda c, a: lambda: bptt_speed._block(c(*a)))(compiled, args)
        if name == "layer fwd+bwd":
            ops["layer"] = loop_bodies(compiled.as_text())
    torch_run = _torch_layer(cell, spec, params, xs, ct, threads)
    if torch_run is not None:
        run, states = torch_run
        ours = np.array(rnn_states(params, spec, xs))
        assert np.allclose(states(), ours, atol=1e-4), "torch's layer disagrees with rnn_states"
        runners["torch fwd+bwd"] = run
    med = bptt_speed.round_robin(runners, rounds)
    return {"shape": shape, "store": store, "med": med, "ops": ops["layer"]}


def reverse_forms(shape, rounds: int) -> dict:
    """The reverse loop's matmul dh(t-1) = (dG(t) * k(t)) Wh^T [B, G N1] x [G N1, N1] in three forms,
    scanned over T (LSTM, G = 4), beside the forward's h Wh [B, N1] x [N1, G N1]: us per step."""
    t, b, _, n1, _ = shape
    g = 4
    k = jax.random.uniform(jax.random.key(0), (t, b, g * n1), jnp.float32, -0.5, 0.5)  # |dh| stays bounded
    wh = jax.random.normal(jax.random.key(1), (n1, g * n1), jnp.float32) / np.sqrt(g * n1)
    h0 = jnp.ones((b, n1), jnp.float32)
    tile = lambda dh, k_t: jnp.tile(dh, (1, g)) * k_t  # noqa: E731

    def transposed(k, wh):  # the library's form: Wh^T made once, outside the loop
        wt = wh.T
        return lax.scan(lambda dh, k_t: (tile(dh, k_t) @ wt, None), h0, k, reverse=True)[0]

    def contract_wh(k, wh):  # contract with Wh's second axis directly: no transposed copy
        dims = (((1,), (1,)), ((), ()))
        return lax.scan(lambda dh, k_t: (lax.dot_general(tile(dh, k_t), wh, dims), None), h0, k, reverse=True)[0]

    def per_gate(k, wh):  # one [B, N1] x [N1, N1] matmul per gate block, summed
        wts = [wh[:, i * n1 : (i + 1) * n1].T for i in range(g)]

        def body(dh, k_t):
            dg = tile(dh, k_t)
            return sum(dg[:, i * n1 : (i + 1) * n1] @ wts[i] for i in range(g)), None

        return lax.scan(body, h0, k, reverse=True)[0]

    def forward_form(k, wh):
        return lax.scan(lambda h, k_t: ((h @ wh + k_t)[:, :n1], None), h0, k)[0]

    forms = {"dG Wh^T": transposed, "dG contracted with Wh": contract_wh, "per gate block": per_gate}
    forms["forward h Wh"] = forward_form
    want = transposed(k, wh)
    runners = {}
    for name, fn in forms.items():
        compiled, _, _, _ = bptt_speed.compile_jax(fn, k, wh)
        if name != "forward h Wh":
            got = np.asarray(compiled(k, wh))
            assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), f"{name} disagrees with dG Wh^T"
        runners[name] = (lambda c: lambda: bptt_speed._block(c(k, wh)))(compiled)
    return {name: v / t * 1e6 for name, v in bptt_speed.round_robin(runners, rounds).items()}


def report(cell: str, rows: list[dict]) -> list[str]:
    lines = [
        f"## {cell.upper()}: microseconds per step (median), one layer, float32",
        "",
        "| T, B, N, N1 | gates | layer fwd+bwd | torch fwd+bwd | ours / torch | forward loop | of which matmul"
        " | gate math | loop only | reverse loop | reverse matmul | bulk matmuls | ops per step in loops (matmuls) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, b, n, n1, _ = r["shape"]
        us = {k: v / t * 1e6 for k, v in r["med"].items()}
        fwd = us["forward loop (with projection)"] - us["projection"]
        torch_us = us.get("torch fwd+bwd", float("nan"))
        ratio = torch_us / us["layer fwd+bwd"]
        ops = ", ".join(f"{o} ({d})" for o, d in r["ops"])
        lines.append(
            f"| {t}, {b}, {n}, {n1} | {'store' if r['store'] else 'recompute'} | {us['layer fwd+bwd']:.1f} "
            f"| {torch_us:.1f} | {1 / ratio:.2f} | {fwd:.1f} | {us['+ matmul'] - us['loop only']:.1f} "
            f"| {fwd - us['+ matmul']:.1f} | {us['loop only']:.1f} | {us['reverse loop']:.1f} "
            f"| {us['reverse matmul']:.1f} | {us['bulk matmuls']:.1f} | {ops} |"
        )
    lines += [
        "",
        "ours / torch: the layer's time over PyTorch's (below 1: ours is faster). forward loop: the scan"
        " less the hoisted projection; of which matmul: (+ matmul) - (loop only); gate math: forward loop"
        " - (+ matmul); reverse loop: cell.reverse with the stored states (its recomputed gates included"
        " where the rules recompute); reverse matmul: the stripped reverse scan (matmul, one multiply, the"
        " store); bulk matmuls: projection + weight gradients + dX over the whole sequence.",
        "",
    ]
    return lines


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out")
    ap.add_argument("--cell", action="append", choices=list(TORCH))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    rounds = 2 if args.quick else args.rounds
    cpu = gate_blocks.cpu_model()
    lines = [
        f"# Where a layer's time goes ({datetime.date.today()})",
        "",
        f"CPU: {cpu}; {platform.machine()}, jax {jax.__version__}, "
        f"python {platform.python_version()}; command: `python benchmarks/step_profile.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`; {rounds} rounds, medians.",
        "",
    ]
    if "lstm" in (args.cell or list(TORCH)):
        forms = {shape: reverse_forms(shape, rounds) for shape in shapes}
        names = list(next(iter(forms.values())))
        lines += [
            "## The reverse loop's matmul in three forms (LSTM, G = 4), us per step",
            "",
            "| T, B, N1 | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for (t, b, _, n1, _), us in forms.items():
            lines.append(f"| {t}, {b}, {n1} | " + " | ".join(f"{us[n]:.1f}" for n in names) + " |")
        lines.append("")
    for cell in args.cell or list(TORCH):
        rows = []
        for shape in shapes:
            rows.append(bench(cell, shape, rounds, args.threads))
            print(f"{cell} {shape} done", file=sys.stderr)
        lines += report(cell, rows)
    return bptt_speed._report(lines, args.out)  # printed, and written to --out


if __name__ == "__main__":
    main()
