"""The backward building blocks of the explicit BPTT, for any cell: one layer over a run of steps,
one layer block by block, the readout, and the stack walked top-down (both paths share one loop).

The plain loop (lecture notes' notation, row vectors), for a stack of L layers, one direction::

    dh_carry[k] = 0 for every layer k                      # dZ1(T) W11^T
    for t in reversed(range(T)):
        dZ2(t) = dDIV/dZ2(t)                               # Y(t) - D(t) for softmax + cross-entropy
        dW2 += h_top(t)^T dZ2(t);  db2 += dZ2(t)
        dH_above = dZ2(t) W2^T
        for k in reversed(range(L)):
            dh(t)  = dH_above + dh_carry[k]                # dh(t) = dZ2(t) W2^T + dZ1(t+1) W11^T
            dZ1(t) = dh(t) * f1'(h(t))                     # f1' computed from h(t); 0 at padded steps
            dW1 += X(t)^T dZ1(t);  dW11 += h(t-1)^T dZ1(t);  db1 += dZ1(t)
            dH_above = dZ1(t) W1^T                         # the gradient handed to layer k-1 (or dX(t))
            dh_carry[k] = dZ1(t) W11^T                     # = dh(t) at padded steps: passes through
    dh(-1)[k] = dh_carry[k]

Time blocks. The scans below run that loop a block of C consecutive steps at a time, from the last
block to the first: one reverse ``lax.scan`` over blocks carries dh_carry (one [B, W] per layer) and
the weight-gradient sums. Inside a block, Z2, dZ2 and dZ2 W2^T are formed for the block's C steps
only, each layer runs its reverse recurrence over the C steps (the cell's ``reverse``), and the "+="
sums are matmuls over the block's C*B rows added to the carried sums. Only h(t) (and, with gates
stored, a gated cell's gates) lives across the whole sequence; everything else is [C, B, ...].
C = T is the whole-sequence computation. The gated cells (GRU, LSTM) either recompute their gates
per block from h(t-1) and X(t) (two block matmuls) or read the gates the forward scan kept
(``Plan.store``).

Two paths walk the stack (``_down_the_stack`` is their shared layer loop):

- ``stack_backward_blocked``, unidirectional stacks: readout and every layer together, block by block.
- ``stack_backward``, bidirectional networks and the custom VJP: the readout needs both directions
  at the same input time, and with lengths the reverse net's blocks are ragged in input time, so the
  gradients handed between layers stay whole-sequence [T, B, ...] arrays; each layer's reverse
  recurrence and weight-gradient sums still run block by block (``layer_backward_blocked``). A
  bidirectional layer's reverse net ran over reversed time, so its BPTT is the same reverse scan on
  reversed time: it runs from input time 0 up to T-1.

Every function takes the resolved ``plan.Plan`` (block size, unroll, scans or kernels, what to return).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import activations, cells, forward, kernels, losses, native, precision
from bptt_jax.core.cells import gru, lstm
from bptt_jax.core.cells.base import flat
from bptt_jax.core.params import LayerParams, ReadoutParams, RNNParams, RNNSpec
from bptt_jax.core.plan import Plan
from bptt_jax.core.precision import mm, zeros_acc

Array = jax.Array


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


@overload
def _blocks(a: Array, c: int) -> Array: ...
@overload
def _blocks(a: None, c: int) -> None: ...
def _blocks(a: Array | None, c: int) -> Array | None:
    """[n*C, ...] -> [n, C, ...] (a reshape, no copy)."""
    if a is None:
        return None
    return a.reshape((a.shape[0] // c, c) + a.shape[1:])


def _unblock(a: Array | None) -> Array | None:
    if a is None:
        return None
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _entering_state(h0: Array, hs_b: Array, i: Array) -> Array:
    """[B, W]: the state entering block ``i`` of ``hs_b`` [n, C, B, W] -- h0 for the first block,
    else the last state of block i - 1 -- read inside the reverse scan from the stored states
    themselves (``hs_b`` as ``precision.hide`` leaves it), not from a gathered copy of all n
    (in bfloat16 at (100, 64, 256, 512, 256) that copy was 1.25 MiB of a 15.2 MiB peak)."""
    c = hs_b.shape[1]
    last = lax.dynamic_slice(hs_b, (jnp.maximum(i - 1, 0), c - 1) + (0,) * (hs_b.ndim - 2), (1, 1) + hs_b.shape[2:])
    last = precision.per_block(last[0, 0], h0)
    return jnp.where(i == 0, h0, last)


def run_forward(params: RNNParams, spec: RNNSpec, xs: Array, h0, lengths: Array | None, plan: Plan):
    """The forward pass the backward pass reads: ``forward.run_stack`` by the plan (projections per
    block, gates kept when ``plan.store``)."""
    return forward.run_stack(
        params,
        spec,
        xs,
        h0,
        lengths,
        unroll=plan.unroll,
        block_size=plan.block,
        recurrence=plan.recurrence,
        store=plan.store,
    )


def cell_backward(
    layer,
    activation: str,
    xs: Array,
    s_in: Array,
    ss: Array,
    dhs_above: Array,
    valid: Array | None,
    plan: Plan,
    *,
    ds_init: Array | None,
    cache: Array | None = None,
    want_dx: bool = True,
):
    """One layer's BPTT over a run of C steps (scan time), for any cell: its reverse recurrence
    (``cell.reverse``, or the Elman kernel), its "+=" weight-gradient sums over the C steps and,
    with ``want_dx``, dX = dA Wx^T (the gradient handed to the layer below).

    Args:
      layer: the cell's parameters (their type names the cell).
      xs: [C, B, N_in] the layer's input; s_in: [B, W] the state entering the first step;
      ss: [C, B, W] the states; dhs_above: [C, B, N1]; valid: [C, B] or None;
      plan: unroll, recurrence and with_norms are read.
      ds_init: [B, W] the carry entering from beyond the last step (None: zeros).
      cache: [C, B, CACHE N1] a gated cell's stored gates (None: the cell recomputes them).

    Returns:
      (grads (the cell's NamedTuple), ds(-1) [B, W], dX [C, B, N_in] or None, ||dh(t)|| [C, B] or None).
    """
    cell = cells.of(layer)
    s_tm1s = jnp.concatenate([s_in[None], ss[:-1]], axis=0)  # [C, B, W] s(t-1)
    if plan.recurrence == "pallas":  # the Elman cell only (kernels.resolve)
        das, ds_m1, norms = kernels.reverse_recurrence(layer.w11, activation, ss, dhs_above, valid, ds_init)
        dvs, norms = das, norms if plan.with_norms else None
    elif plan.recurrence == "native" and cells.name_of(layer) == "elman":  # float32 on the CPU
        if native.sums_in_kernel("elman", xs.shape[0] * xs.shape[1], xs.shape[1], layer.w11.shape[0], True):
            grads, ds_m1, dzx, norms = native.elman_reverse_sums(
                layer, activation, xs, s_in, ss, dhs_above, valid, ds_init, dx=want_dx
            )  # the sums and dX on the kernel's helper thread, beside the steps
            return grads, ds_m1, dzx if want_dx else None, norms if plan.with_norms else None
        das, ds_m1, norms = native.elman_reverse(layer.w11, activation, ss, dhs_above, valid, ds_init)
        dvs, norms = das, norms if plan.with_norms else None
    elif plan.recurrence == "native":  # a gated cell in float32 on the CPU (kernels.resolve)
        name = cells.name_of(layer)
        # weight gradients summed in the kernel for long blocks (native.sums_in_kernel)
        c_len, batch = xs.shape[0], xs.shape[1]
        rule = (name, c_len * batch, batch, layer.wh.shape[0], cache is not None)
        in_kernel, dx_here = native.sums_in_kernel(*rule), want_dx and native.dx_in_kernel(*rule)
        if cache is None:  # gates="recompute": the gate cache from A(t) and s(t-1), two block matmuls
            cache = (lstm.gate_cache if name == "lstm" else gru.gate_cache)(layer, xs, s_tm1s)
        if dx_here:  # dX made on the kernel's helper thread beside the steps too
            grads, ds_m1, dx, norms = native.reverse_dx(name, layer, xs, dhs_above, cache, s_in, ss, valid, ds_init)
            return grads, ds_m1, dx, norms if plan.with_norms else None
        grads, ds_m1, das, norms = native.reverse(
            name, layer, xs, dhs_above, cache, s_in, ss, valid, ds_init, sum_in_kernel=in_kernel
        )
        return grads, ds_m1, cell.input_grad(layer, das) if want_dx else None, norms if plan.with_norms else None
    else:
        das, dvs, ds_m1, norms = cell.reverse(
            layer,
            activation,
            xs,
            s_tm1s,
            ss,
            dhs_above,
            valid,
            ds_init,
            with_norms=plan.with_norms,
            unroll=plan.unroll,
            cache=cache,
        )
    return (
        cell.weight_grads(layer, xs, s_tm1s, das, dvs),
        ds_m1,
        cell.input_grad(layer, das) if want_dx else None,
        norms,
    )


def layer_backward_blocked(
    layer,
    activation: str,
    xs: Array,
    hs: Array,
    h0: Array,
    dhs_above: Array,
    valid: Array | None,
    plan: Plan,
    *,
    want_dx: bool = True,
    ds_last: Array | None = None,
    cache: Array | None = None,
):
    """One layer's BPTT given the gradient from above for all t, block by block (scan time).

    A reverse scan over blocks of C = ``plan.block`` steps carries ds (dh, and dc for the LSTM) and
    the weight-gradient sums; per block it runs ``cell_backward`` over the C steps.

    Args:
      layer: the cell's parameters (Elman: W1 [N_in, N1], W11 [N1, N1], b1 [N1]).
      xs: [T, B, N_in] the layer's input; hs: [T, B, W] its states; h0: [B, W] the state before step 0.
      dhs_above: [T, B, N1]; valid: [T, B] or None. T must be a multiple of the block size.
      ds_last: [B, W] the gradient reaching the state after the last step from outside (a
        differentiated final carry), entering the reverse recurrence as its first carry; None: 0.
      cache: [T, B, CACHE N1] a gated cell's stored gates (scan time), or None: recomputed per block.

    Returns:
      (grads, ds_m1 [B, W], dxs [T, B, N_in] = dA(t) Wx^T (Elman: dZ1(t) W1^T) or None, dh_norm [T, B] or None).
    """
    c = plan.block
    hs_b = _blocks(hs, c)
    zero = jax.tree_util.tree_map(zeros_acc, layer)

    def body(carry, blk):
        dh, g = carry
        x_blk, h_blk, i, above_blk, valid_blk, cache_blk = precision.per_block(blk, blk_in)
        h_in = _entering_state(h0, hs_hidden, i)
        g_blk, dh, dx, dh_norm = cell_backward(
            layer,
            activation,
            x_blk,
            h_in,
            h_blk,
            above_blk,
            valid_blk,
            plan,
            ds_init=dh,
            cache=cache_blk,
            want_dx=want_dx,
        )  # dx: [C, B, N_in] or None
        return (dh, _tree_add(g, g_blk)), (dx, dh_norm)

    hs_hidden = precision.hide(hs_b)
    blk_in = (
        _blocks(xs, c),
        hs_b,
        jnp.arange(hs_b.shape[0]),  # the block's index: its entering state is read from hs_b
        _blocks(dhs_above, c),
        _blocks(valid, c),
        _blocks(cache, c),
    )
    ds0 = zeros_acc(h0) if ds_last is None else ds_last
    (dh_m1, grads), (dxs, dh_norm) = lax.scan(body, (ds0, zero), precision.hide(blk_in), reverse=True)
    return grads, dh_m1, _unblock(dxs), _unblock(dh_norm)


def readout(params: RNNParams, spec: RNNSpec, top: Array) -> tuple[Array, Array]:
    """(Z2 = h W2 + b2, Y = f2(Z2)) for every step given: [T, B, M] each."""
    z2s = mm(top, params.readout.w2) + params.readout.b2
    return z2s, activations.output(spec.output_activation, z2s)


def readout_backward(params: RNNParams, spec: RNNSpec, top: Array, targets: Array, w: Array, *, generic: bool = False):
    """The output layer, forward and backward, for a run of steps (a block or the whole sequence).

    Args:
      top: [C, B, N_top] the readout's input (the top layer's merged states, after any dropout).
      targets: [C, B] or [C, B, M]; w: [C, B] effective weights.

    Returns:
      (DIV of these steps, readout grads, dDIV/dtop [C, B, N_top] = dZ2(t) W2^T).
    """
    z2s, ys = readout(params, spec, top)
    div = losses.total(losses.divergence(spec.divergence, z2s, ys, targets), w)
    dz2s = losses.output_grad(spec.divergence, spec.output_activation, z2s, ys, targets, w, generic=generic)
    g_readout = ReadoutParams(mm(flat(top).T, flat(dz2s)), jnp.sum(dz2s, axis=(0, 1)))
    return div, g_readout, mm(dz2s, params.readout.w2.T)


def _down_the_stack(
    spec: RNNSpec, dmerged_top: Array, layer_step: Callable[[int, int, Array, bool], Array | None], want_dx: bool
) -> Array | None:
    """The top-down loop over layers (not time) that both stack paths run.

    Layer k's direction j gets its part of the gradient reaching the layer's merged states (both
    directions read all of it when merged by sum; its half when concatenated) and returns, when asked,
    dA Wx^T: the gradient it hands the layer below, in input time. The directions' parts add up.
    ``layer_step(k, j, dhs_above, want_dx)`` does one layer's BPTT and keeps what it needs.

    Returns:
      What reaches the bottom (dDIV/dX), or None when ``want_dx`` is False.
    """
    above: Array | None = dmerged_top
    for k in reversed(range(spec.num_layers)):
        assert above is not None
        n1 = spec.hidden_sizes[k]
        if not spec.bidirectional:
            parts: tuple[Array, ...] = (above,)
        elif spec.merge == "concat":
            parts = (above[..., :n1], above[..., n1:])
        else:
            parts = (above, above)
        want = k > 0 or want_dx
        below: Array | None = None
        for j, part in enumerate(parts):
            dx = layer_step(k, j, part, want)
            if dx is not None:
                below = dx if below is None else below + dx
        above = below
    return above


def stack_backward(
    params: RNNParams,
    spec: RNNSpec,
    traces: tuple[forward.LayerTrace, ...],
    h0: tuple[Array, ...],
    lengths: Array | None,
    dmerged_top: Array,
    plan: Plan,
    *,
    ds_last: tuple[Array, ...] | None = None,
):
    """BPTT through the whole stack given dDIV/d(top merged states) for all t, top layer first.

    The path for bidirectional networks and for ``vjp.rnn_states``: the gradient handed from layer
    to layer is a whole-sequence array (module docstring); each layer's reverse recurrence and
    weight-gradient sums run block by block (``layer_backward_blocked``).

    Args:
      traces: the forward pass's ``forward.run_stack`` output.
      h0: L*D entries [B, W].
      dmerged_top: [T, B, N_top] dDIV/d(top layer's merged states), in input time.
      plan: its block divides T; with_norms and with_dxs say what is returned.
      ds_last: L*D entries [B, W] (internal layout), dDIV/d(each entry's final state) from outside,
        or None (the final states are not used).

    Returns:
      (layers grads, reverse_layers grads, dxs [T, B, N] or None, dh0 (L*D), dh_norms [T, L*D] or None).
    """
    valid = forward.valid_mask(lengths, dmerged_top.shape[0])
    d = spec.num_directions
    g_layers: list[Any] = [None] * spec.num_layers
    g_reverse: list[Any] = [None] * spec.num_layers
    dh0: list[Any] = [None] * (spec.num_layers * d)
    norms: list[Any] = [None] * (spec.num_layers * d)
    to_scan_time = lambda a, j: a if j == 0 else forward.reverse_padded(a, lengths)  # its own inverse

    def layer_step(k: int, j: int, above: Array, want_dx: bool) -> Array | None:
        tr, i = traces[k], k * d + j
        grads, dh0[i], dx, dh_norm = layer_backward_blocked(
            params.layers[k] if j == 0 else params.reverse_layers[k],
            spec.activation,
            to_scan_time(tr.inputs, j),
            tr.states[j],
            h0[i],
            to_scan_time(above, j),
            valid,
            plan,
            want_dx=want_dx,
            ds_last=None if ds_last is None else ds_last[i],
            cache=None if tr.caches is None else tr.caches[j],
        )
        (g_layers if j == 0 else g_reverse)[k] = grads
        if plan.with_norms:
            norms[i] = jnp.mean(to_scan_time(dh_norm, j), axis=1)  # [T]
        return to_scan_time(dx, j) if want_dx else None  # input time

    dxs = _down_the_stack(spec, dmerged_top, layer_step, plan.with_dxs)
    dh_norms = jnp.stack(norms, axis=1) if plan.with_norms else None
    return tuple(g_layers), tuple(g for g in g_reverse if g is not None), dxs, tuple(dh0), dh_norms


class Carry(NamedTuple):
    """What the reverse scan over blocks carries (unidirectional stacks)."""

    dh: tuple[Array, ...]  # L entries [B, W]: dZ1(t+1) W11^T entering the block from the right
    layers: tuple[LayerParams, ...]  # the weight-gradient sums so far
    readout: ReadoutParams
    div: Array  # DIV so far


def zero_carry(params: RNNParams, h0: tuple[Array, ...]) -> Carry:
    """The carry entering from beyond the last step: zeros, in the dtype gradients accumulate in."""
    zeros = lambda t: jax.tree_util.tree_map(zeros_acc, t)
    div = zeros_acc(params.readout.b2[0])
    return Carry(tuple(zeros_acc(h) for h in h0), zeros(params.layers), zeros(params.readout), div)


class Run(NamedTuple):
    """A unidirectional stack's forward pass over T' steps (a multiple of the block) and its targets,
    or (``dtop``) the gradient reaching its top layer's states from outside (the custom VJP's
    cotangent), which then takes the readout's place: no readout, DIV 0, no readout gradient."""

    xs: Array  # [T', B, N]
    hs: tuple[Array, ...]  # L entries [T', B, W]
    h0: tuple[Array, ...]  # L entries [B, W]: the states before step 0
    valid: Array | None  # [T', B]
    targets: Array | None  # [T', B] or [T', B, M]; None with dtop
    w: Array | None  # [T', B] effective weights; None with dtop
    output_mask: Array | None = None  # [T', B, N_top]
    caches: tuple[Array, ...] | None = None  # L entries [T', B, CACHE N1]: the stored gates
    dtop: Array | None = None  # [T', B, N_top] dDIV/d(top layer's h(t)) from outside, instead of a readout


def stack_backward_blocked(params: RNNParams, spec: RNNSpec, run: Run, carry: Carry, plan: Plan):
    """Unidirectional stacks: readout and every layer's BPTT together, block by block (module doc).

    ``carry`` enters from beyond the last step (zeros, or a later segment's). Returns (carry at
    step 0, dxs [T', B, N] or None, norms [T', L] or None).
    """
    c, n_layers = plan.block, spec.num_layers
    hs_b = tuple(_blocks(h, c) for h in run.hs)
    hs_hidden = precision.hide(hs_b)
    cell = cells.get(spec.cell)

    def body(carry: Carry, blk):
        x_blk, h_blks, i, valid_blk, tg_blk, w_blk, mask_blk, cache_blks, dtop_blk = precision.per_block(blk, blk_in)
        h_ins = tuple(_entering_state(run.h0[k], hs_hidden[k], i) for k in range(n_layers))
        if dtop_blk is not None:  # the gradient from outside: no readout
            div, g_readout, above = zeros_acc(carry.div), None, dtop_blk
        else:
            top = cell.hidden(h_blks[-1])  # h(t) of the top layer's state
            top = top if mask_blk is None else top * mask_blk  # dropout on the readout's input
            div, g_readout, above = readout_backward(params, spec, top, tg_blk, w_blk, generic=plan.generic)
        if mask_blk is not None:
            above = above * mask_blk
        dh, g_layers = list(carry.dh), list(carry.layers)
        norms: list[Any] = [None] * n_layers

        def layer_step(k: int, j: int, above_k: Array, want_dx: bool) -> Array | None:
            layer = params.layers[k]
            x_k = precision.rounded(x_blk, h_ins[0].dtype) if k == 0 else cell.hidden(h_blks[k - 1])
            cache = None if cache_blks is None else cache_blks[k]
            g_k, dh[k], dx, dh_norm = cell_backward(
                layer,
                spec.activation,
                x_k,
                h_ins[k],
                h_blks[k],
                above_k,
                valid_blk,
                plan,
                ds_init=dh[k],
                cache=cache,
                want_dx=want_dx,
            )
            g_layers[k] = _tree_add(g_layers[k], g_k)
            if dh_norm is not None:  # with_norms
                norms[k] = jnp.mean(dh_norm, axis=1)  # [C]
            return dx  # [C, B, N_in] or None: to layer k-1 (or dX)

        dxs = _down_the_stack(spec, above, layer_step, plan.with_dxs)
        g_ro = carry.readout if g_readout is None else _tree_add(carry.readout, g_readout)
        new = Carry(tuple(dh), tuple(g_layers), g_ro, carry.div + div)
        return new, (dxs, jnp.stack(norms, axis=1) if plan.with_norms else None)

    blk_in = (
        _blocks(run.xs, c),
        hs_b,
        jnp.arange(hs_b[0].shape[0]),  # the block's index: the entering states are read from hs_b
        _blocks(run.valid, c),
        _blocks(run.targets, c),
        _blocks(run.w, c),
        _blocks(run.output_mask, c),
        None if run.caches is None else tuple(_blocks(a, c) for a in run.caches),
        _blocks(run.dtop, c),
    )
    carry, (dxs, norms) = lax.scan(body, carry, precision.hide(blk_in), reverse=True)
    return carry, _unblock(dxs), _unblock(norms)
