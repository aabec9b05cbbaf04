"""The cells' two loops as a compiled CPU kernel (recurrence="native"), against the scans.

    python benchmarks/native_kernel.py [--cell elman|lstm|gru] [--no-torch] [--quick] [--rounds R] [--out FILE]

Issue 35's third lever: one layer's forward step loop and reverse recursion written in C++
(``bptt_jax/core/cell_kernels.cc``: per step one matmul, the file's own, for h(t-1) Wh (W11), or
dV(t) Wh^T (dZ1(t) W11^T) in reverse, and one fused, vectorized pass over the batch rows for f1 or
the gate arithmetic; the loops the module docstrings of ``bptt_jax.core.cells`` write out),
compiled by ``bptt_jax.core.native`` on this machine (``-O3 -march=native``, jaxlib's XLA FFI
headers) and called through ``jax.ffi``. Per cell and benchmark shape (float32, every sequence
full length; the Elman cell with tanh at ``bptt_speed.SHAPES``, the gated cells at ``GATED_SHAPES``):

  forward loop   the library's ``forward.unroll_layer(..., store=True)`` (input projection + scan
                 keeping the gate cache) against the kernel's forward (which forms the projection;
                 for the Elman cell also the same call given u(t) = X(t) W1 + b1 from XLA's matmul,
                 the column "from u(t) / from X");
  reverse loop   the cell's ``reverse`` given the stored gate cache, and the layer's weight
                 gradients, against the kernel's reverse call (sums where native.sums_in_kernel says);
  layer          forward + explicit BPTT of the layer (``backward.cell_backward``: the reverse loop
                 and the weight-gradient and dX matmuls) against the same with both kernel loops;
  torch          PyTorch's ``nn.LSTM`` / ``nn.GRU`` forward + ``backward`` of the same cotangent
                 (oneDNN's fused layer, eager; where torch imports), beside the layer rows;
  whole call     ``bptt`` (the cell + softmax readout) with the rules' plan, the same plan with
                 recurrence="native", and PyTorch's layer + nn.Linear eager.

Every pair is checked equal (1e-4 relative) before timing; compiled programs timed side by side
(round robin, random order, medians). Reported: scan time over kernel time (above 1: the kernel is
faster) and the kernel layer's time over PyTorch's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402
import gated  # noqa: E402
import step_profile  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import backward, cells, forward, native, plan  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]


def unavailable() -> str | None:
    """Why the library's kernel cannot run here (building it on first call), or None."""
    return native.unavailable()


def kernel_forward(cell, layer, xs, s0, valid=None):
    """(states [T, B, W], gate cache [T, B, native.cache_width N1]; the Elman cell's empty [T, B, 0]) by the kernel,
    the input projection included (every cell's kernel forms it)."""
    if cell == "elman":  # as the library calls it: the kernel forms X W1 + b1 too
        hs = native.elman_forward_x(layer, "tanh", xs, s0, valid)
        return hs, jnp.zeros(hs.shape[:-1] + (0,), hs.dtype)
    return native.forward(cell, layer, xs, s0, valid, store=True)  # it forms X Wx + bx itself


def kernel_reverse(cell, layer, xs, dhs_above, gates, s_in, ss, valid=None, ds_init=None):
    """(dA [T, B, G N1], the layer's weight gradients, ds(-1) [B, W]) by the kernel's reverse call (its
    sums where native.sums_in_kernel says, else XLA's matmuls; the Elman cell's dA = dZ1)."""
    t, b, _ = xs.shape
    if cell == "elman":
        if native.sums_in_kernel("elman", t * b, b, layer.w11.shape[0], True):  # as backward.cell_backward
            grads, dh_m1, dz, _ = native.elman_reverse_sums(
                layer, "tanh", xs, s_in, ss, dhs_above, valid, ds_init, dx=False
            )
            return dz, grads, dh_m1
        dz, dh_m1, _ = native.elman_reverse(layer.w11, "tanh", ss, dhs_above, valid, ds_init)
        prev = jnp.concatenate([s_in[None], ss[:-1]], axis=0)
        return dz, cells.elman.weight_grads(layer, xs, prev, dz, dz), dh_m1
    inside = native.sums_in_kernel(cell, t * b, b, layer.wh.shape[0], True)  # as backward.cell_backward
    grads, ds_m1, das, _ = native.reverse(
        cell, layer, xs, dhs_above, gates, s_in, ss, valid, ds_init, sum_in_kernel=inside
    )
    return das, grads, ds_m1


def as_kernels(kernel, scan):
    """(kernel, scan) outputs for the equality check, the scans' gate caches cut to the kernel's width
    (the GRU's kernel keeps [r | z | n] where ``native.gru_keeps_vn`` does not hold, the scans
    [r | z | n | V_n]; the leading 3 N1 are the same)."""
    k_leaves, tree = jax.tree_util.tree_flatten(kernel)
    s_leaves = jax.tree_util.tree_leaves(scan)
    cut = [
        s[..., : k.shape[-1]] if s.ndim == k.ndim and s.shape[:-1] == k.shape[:-1] and s.shape[-1] > k.shape[-1] else s
        for k, s in zip(k_leaves, s_leaves, strict=True)
    ]
    return kernel, jax.tree_util.tree_unflatten(tree, cut)


def check_lengths(cell: str) -> float:
    """The kernel's padding and entering carries against the library's scans (lengths 0 .. T, h0, an
    entering carry): the largest relative difference; raises above 1e-4."""
    mod = cells.get(cell)
    t, b, n, n1 = 9, 5, 4, 6
    w = mod.state_width(n1)
    layer = bj.init_params(jax.random.key(3), bj.RNNSpec(n, (n1,), 2, cell=cell)).layers[0]
    k = jax.random.split(jax.random.key(4), 4)
    xs = jax.random.normal(k[0], (t, b, n), jnp.float32)
    s0 = jax.random.normal(k[1], (b, w), jnp.float32)
    above = jax.random.normal(k[2], (t, b, n1), jnp.float32)
    ds_init = jax.random.normal(k[3], (b, w), jnp.float32)
    valid = forward.valid_mask(jnp.array([0, 3, 9, 1, 6]), t)

    def both(layer, xs, s0, above, ds_init):
        ss, gates = forward.unroll_layer(layer, "tanh", xs, s0, valid, store=True)
        prev = jnp.concatenate([s0[None], ss[:-1]], axis=0)
        das, dvs, ds_m1, _ = mod.reverse(
            layer, "tanh", xs, prev, ss, above, valid, ds_init, with_norms=False, cache=gates
        )
        scan = (das, mod.weight_grads(layer, xs, prev, das, dvs), ds_m1)
        kss, kgates = kernel_forward(cell, layer, xs, s0, valid)
        return (ss, *scan), (kss, *kernel_reverse(cell, layer, xs, above, kgates, s0, kss, valid, ds_init))

    scan, kernel = jax.jit(both)(layer, xs, s0, above, ds_init)
    err = bptt_speed.max_rel_err(*as_kernels(kernel, scan))
    if err > 1e-4:
        raise AssertionError(f"{cell}: with lengths, h0 and a carry the kernel differs from the scan ({err:.2e})")
    return err


def contenders(cell, shape):
    """{comparison: {way: (function, args)}} at one shape, and the layer's inputs for torch."""
    mod = cells.get(cell)
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    layer = params.layers[0]
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    above = jax.random.normal(jax.random.key(2), (t, b, n1), jnp.float32)
    s0 = jnp.zeros((b, mod.state_width(n1)), jnp.float32)
    p = plan.Plan(block=t, store=True, segment=None, unroll=1, recurrence="scan", with_dxs=True)

    def scan_forward(layer, xs):
        return forward.unroll_layer(layer, "tanh", xs, s0, None, store=True)

    def prev(ss):
        return jnp.concatenate([s0[None], ss[:-1]], axis=0)

    def scan_reverse(layer, xs, ss, gates, above):
        das, dvs, ds_m1, _ = mod.reverse(
            layer, "tanh", xs, prev(ss), ss, above, None, None, with_norms=False, cache=gates
        )
        return das, mod.weight_grads(layer, xs, prev(ss), das, dvs), ds_m1

    def native_reverse(layer, xs, ss, gates, above):
        return kernel_reverse(cell, layer, xs, above, gates, s0, ss)

    def scan_layer(layer, xs, above):
        ss, gates = scan_forward(layer, xs)
        grads, ds0, dx, _ = backward.cell_backward(layer, "tanh", xs, s0, ss, above, None, p, ds_init=None, cache=gates)
        return ss, grads, ds0, dx  # dX = dA Wx^T, made by cell_backward

    def native_layer(layer, xs, above):
        ss, gates = kernel_forward(cell, layer, xs, s0)
        das, grads, ds0 = kernel_reverse(cell, layer, xs, above, gates, s0, ss)
        return ss, grads, ds0, mod.input_grad(layer, das)

    ss, gates = jax.jit(scan_forward)(layer, xs)
    rev_args = (layer, xs, ss, gates, above)
    extra = {}
    if cell == "elman":  # the Elman forward call given u(t) (XLA's projection first) against from X
        extra["forward from X"] = {
            "scan": (
                lambda l, x: native.elman_forward(l.w11, "tanh", cells.elman.project(l, x), s0, None),
                (layer, xs),
            ),
            "kernel": (lambda l, x: native.elman_forward_x(l, "tanh", x, s0, None), (layer, xs)),
        }
    return {
        **extra,
        "forward loop": {
            "scan": (scan_forward, (layer, xs)),
            "kernel": (lambda l, x: kernel_forward(cell, l, x, s0), (layer, xs)),
        },
        "reverse loop": {"scan": (scan_reverse, rev_args), "kernel": (native_reverse, rev_args)},
        "layer": {"scan": (scan_layer, (layer, xs, above)), "kernel": (native_layer, (layer, xs, above))},
    }, (spec, params, xs, above)


def whole_call(cell, shape, rounds: int, threads: int):
    """The whole ``bptt`` call (the cell + softmax readout, bptt_speed.py's gated problem) with the
    rules' plan and with recurrence="native" (otherwise the same plan), and PyTorch's layer +
    nn.Linear eager: {contender: median s}, after checking the kernel's gradients against the scans'."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    rules = plan.explicit(plan.Options(recurrence="scan"), spec, t, b, jnp.float32)  # the scans' rules
    fns = {
        "bptt": lambda p, x, d: bj.bptt(p, spec, x, d, recurrence="scan")[:2],
        "bptt native": lambda p, x, d: bj.bptt(
            p, spec, x, d, block_size=rules.block_size, gates=rules.gates, recurrence="native"
        )[:2],
    }
    runners, outs = {}, {}
    for name, fn in fns.items():
        compiled = bptt_speed.compile_jax(fn, params, xs, targets)[0]
        outs[name] = compiled(params, xs, targets)
        runners[name] = lambda c=compiled: bptt_speed._block(c(params, xs, targets))
    err = bptt_speed.max_rel_err(outs["bptt native"], outs["bptt"])
    if err > 1e-4:
        raise AssertionError(f"{shape}: bptt with the kernel differs from the scans ({err:.2e})")
    tc = gated.torch_contender(cell, spec, params, xs, targets, threads) if threads else None
    if tc is not None:
        runners["torch"] = tc[0]
    return bptt_speed.round_robin(runners, rounds), err


def _no_torch(ap) -> None:
    ap.add_argument(
        "--no-torch",
        action="store_true",
        help="leave PyTorch out (its OpenMP threads, spinning between calls, slow the JAX contenders timed after them)",
    )


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, native.CELLS, 11, extra=_no_torch)
    lines = gate_blocks.header("The cells' loops as a compiled CPU kernel", "native_kernel.py", argv, rounds)
    why = unavailable()
    if why is not None:
        lines.append(f"Not run: {why}.")
        return bptt_speed._report(lines, args.out)
    threads = 0 if args.no_torch else os.cpu_count() or 1  # PyTorch's threads, as step_profile.py
    for cell in args.cell or native.CELLS:
        shapes = QUICK_SHAPES if args.quick else bptt_speed.SHAPES if cell == "elman" else bptt_speed.GATED_SHAPES
        lines += cell_tables(cell, shapes, rounds, threads)
    return bptt_speed._report(lines, args.out)


def cell_tables(cell: str, shapes, rounds: int, threads: int) -> list[str]:
    """One cell's two tables: the layer's loops, and the whole call."""
    lines = [
        f"## {cell.upper()}",
        "",
        f"Checked first: with lengths (0 to T), h0 and an entering carry, kernel = scans to {check_lengths(cell):.1e}.",
        "",
        f"One {cell.upper()} layer, float32, full lengths, one block; us per step (median). scan / kernel above",
        "1: the kernel is faster. kernel / torch below 1: the kernel layer is faster than PyTorch's fused layer.",
        "",
        "| T, B, N, N1 | forward loop scan / kernel | reverse loop scan / kernel | layer scan | layer kernel"
        " | layer scan / kernel | torch | kernel / torch |"
        + (" kernel forward: from u(t) / from X |" if cell == "elman" else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if cell == "elman" else ""),
    ]
    whole = []
    for shape in shapes:
        t = shape[0]
        ways, (spec, params, xs, above) = contenders(cell, shape)
        runners, ratios = {}, {}
        for name, pair in ways.items():
            compiled = {w: jax.jit(f).lower(*a).compile() for w, (f, a) in pair.items()}
            outs = {w: compiled[w](*pair[w][1]) for w in pair}
            err = bptt_speed.max_rel_err(*as_kernels(outs["kernel"], outs["scan"]))
            if err > 1e-4:
                raise AssertionError(f"{cell} {shape} {name}: the kernel differs from the scan ({err:.2e})")
            for w in pair:
                runners[f"{name} {w}"] = lambda f=compiled[w], a=pair[w][1]: bptt_speed._block(f(*a))
        torch_run = step_profile._torch_layer(cell, spec, params, xs, above, threads) if threads else None
        if torch_run is not None:
            runners["torch"] = torch_run[0]
        med = bptt_speed.round_robin(runners, rounds)
        for name in ways:
            ratios[name] = med[f"{name} scan"] / med[f"{name} kernel"]
        per_step = {k: 1e6 * v / t for k, v in med.items()}
        torch_us = per_step.get("torch", float("nan"))
        lines.append(
            f"| {shape[:4]} | {ratios['forward loop']:.2f} | {ratios['reverse loop']:.2f} "
            f"| {per_step['layer scan']:.1f} | {per_step['layer kernel']:.1f} | {ratios['layer']:.2f} "
            f"| {torch_us:.1f} | {per_step['layer kernel'] / torch_us:.2f} |"
            + (f" {ratios['forward from X']:.2f} |" if "forward from X" in ratios else "")
        )
        call, err = whole_call(cell, shape, rounds, threads)
        torch_s = call.get("torch", float("nan"))
        whole.append(
            f"| {shape} | {1e3 * call['bptt']:.2f} | {1e3 * call['bptt native']:.2f} | {1e3 * torch_s:.2f} "
            f"| {call['bptt'] / call['bptt native']:.2f} | {torch_s / call['bptt']:.2f} "
            f"| {torch_s / call['bptt native']:.2f} | {err:.1e} |"
        )
    return lines + [
        "",
        f"The whole `bptt` call ({cell.upper()} + softmax readout, float32): the rules' plan with the scans and",
        'with recurrence="native" (the same blocks and gates), against PyTorch\'s layer + nn.Linear eager',
        "(oneDNN); medians in ms, speed ratios above 1: the second is slower.",
        "",
        "| T, B, N, N1, M | bptt (scans) | bptt native | torch | scans / native | torch / scans"
        " | torch / native | gradient difference |",
        "|---|---|---|---|---|---|---|---|",
        *whole,
        "",
    ]


if __name__ == "__main__":
    main()
