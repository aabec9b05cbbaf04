"""Backpropagation through time, written out: explicit reverse ``lax.scan`` loops over blocks of time.

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
block to the first: one reverse ``lax.scan`` over blocks carries dh_carry (one [B, N1] per layer) and
the weight-gradient sums. Inside a block, Z2, dZ2 and dZ2 W2^T are formed for the block's C steps
only, each layer runs its reverse recurrence over the C steps (``layer_backward``), and the "+=" sums
are matmuls over the block's C*B rows added to the carried sums. The forward pass likewise forms the
input projection X(t) W1 + b1 per block (``scan.unroll_layer``). Only h(t) lives across the whole
sequence; everything else is [C, B, ...]. C = T is the whole-sequence computation. When C does not
divide T the sequence is padded at the end with steps that hold the state and weigh 0. The gated
cells (GRU, LSTM) either recompute their gates per block from h(t-1) and X(t) (two block matmuls)
or, with ``gates="store"`` (the default from the cell's ``STORE_FROM`` up to ``STORE_ELEMENTS``
cached elements), read the gate activations the forward scan kept: 4 N1 more floats per step for
no recompute matmuls.

Where blocking does not apply fully:

- bidirectional networks: the readout needs both directions at the same input time, and with lengths
  the reverse net's blocks are ragged in input time, so the readout (Z2, dZ2, dZ2 W2^T) and the
  gradients handed between layers stay whole-sequence [T, B, ...] arrays; each layer's reverse
  recurrence and weight-gradient sums still run block by block (``stack_backward``).
- ``checkpoint_every=k`` (unidirectional): segments of k steps are recomputed in the backward pass;
  inside a segment the blocks are as above, with C the largest divisor of k not above the block size.

A bidirectional layer's reverse net ran over reversed time, so its BPTT is the same reverse scan on
reversed time: it runs from input time 0 up to T-1.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import activations, cells, checks, kernels, losses, scan
from bptt_jax.cells import elman
from bptt_jax.params import LayerParams, ReadoutParams, RNNParams, RNNSpec

Array = jax.Array

# The automatic block size (``auto_block_size``), measured on a 2-core CPU (benchmarks/README.md):
# below WHOLE_ELEMENTS elements in a [T, B, width] buffer the whole sequence is one block (its
# buffers fit in cache and one block runs fastest); above it, blocks of about BLOCK_ELEMENTS elements
# and at least MIN_BLOCK_ROWS rows (C*B) keep the block buffers cache-sized while the block's
# matmuls still have enough rows to run near full speed.
WHOLE_ELEMENTS = 2**20
BLOCK_ELEMENTS = 2**17
MIN_BLOCK_ROWS = 512
# On a GPU the blocks trade speed for memory the other way: measured on an H100 (benchmarks/README.md,
# "On a GPU"), the whole sequence as one block ran 1.1-1.6x faster than the CPU's cache-sized blocks
# at every benchmark shape where the two differ (up to T*B*width = 2^24), at up to 3.3x the temp
# memory (still below jax.grad's). Up to GPU_WHOLE_ELEMENTS the whole sequence is one block there;
# above it (not measured), blocks of about GPU_BLOCK_ELEMENTS.
GPU_WHOLE_ELEMENTS = 2**25
GPU_BLOCK_ELEMENTS = 2**23
# Gated cells: keep the forward's gate activations ("store") instead of recomputing them per block in
# the backward pass ("recompute") while all layers' caches together hold at most STORE_ELEMENTS
# elements (T * B * CACHE * N1 summed over layers and directions: 64 MiB in float32) and at least
# the cell's STORE_FROM. Measured on the 2-core CPU (benchmarks/README.md, "Gated cells: the latest
# run"): storing ran up to 1.22x faster than recomputing at the larger benchmark shapes (0.97-1.22x),
# for about 2-4x the temp memory (still about half of jax.grad's); above the cap memory comes first.
STORE_ELEMENTS = 2**24
GATES = ("auto", "store", "recompute")


class BPTTAux(NamedTuple):
    """Diagnostics of one BPTT pass. Per-(layer, direction) entries are ordered layer * D + direction."""

    dh0: tuple  # L*D entries [B, N1]: dDIV/dh(-1); LSTM: (dDIV/dh(-1), dDIV/dc(-1)) pairs
    dxs: Array | None  # [T, B, N] dDIV/dX, only with with_dxs=True (else None)
    dh_norms: Array | None  # [T, L*D] ||dDIV/dh(t)|| averaged over the batch, in input time
    h_last: tuple  # L*D entries [B, N1] ((h, c) pairs for the LSTM): the forward pass's final states
    dc_norms: Array | None = None  # LSTM, with diagnostics: [T, L*D] ||dDIV/dc(t)||, as dh_norms


def auto_block_size(t_len: int, batch: int, width: int, backend: str | None = None) -> int:
    """The block size C used when ``block_size`` is None.

    Args:
      t_len, batch: T and B.
      width: the widest per-step feature size (the largest of N1 per direction and M).
      backend: "cpu", "gpu", ...; None: JAX's default backend.

    Returns:
      T when T*B*width <= WHOLE_ELEMENTS (GPU_WHOLE_ELEMENTS on a GPU); otherwise about
      max(MIN_BLOCK_ROWS / B, BLOCK_ELEMENTS / (B * width)) steps (GPU_BLOCK_ELEMENTS on a GPU),
      capped at T, preferring a divisor of T within a factor of two of that (no padding steps then).
    """
    batch, width = max(batch, 1), max(width, 1)
    on_gpu = (backend or jax.default_backend()) == "gpu"
    whole, block = (GPU_WHOLE_ELEMENTS, GPU_BLOCK_ELEMENTS) if on_gpu else (WHOLE_ELEMENTS, BLOCK_ELEMENTS)
    if t_len * batch * width <= whole:
        return t_len
    c = max(-(-MIN_BLOCK_ROWS // batch), block // (batch * width), 1)
    if c >= t_len:
        return t_len
    for delta in range(c):  # nearest divisor of T in [c/2, 2c]
        for cand in (c - delta, c + delta):
            if c // 2 <= cand <= 2 * c and 1 <= cand <= t_len and t_len % cand == 0:
                return cand
    return c


def resolve_gates(gates: str, spec: RNNSpec, t_len: int, batch: int, checkpoint_every: int | None) -> bool:
    """Whether the forward pass keeps the gates (True) or the backward pass recomputes them.

    "store" and "recompute" as asked; "auto" stores while the caches of every layer and direction
    hold at most STORE_ELEMENTS elements and at least the cell's STORE_FROM (the GRU's 2^16: below
    it recomputing ran faster, the LSTM's 0). Only gated cells without ``checkpoint_every`` can
    store (the Elman cell has no gates; segments are recomputed anyway): otherwise "auto" recomputes
    and "store" raises.
    """
    if gates not in GATES:
        raise ValueError(f"gates: expected one of {list(GATES)}, got {gates!r}")
    cell = cells.get(spec.cell)
    cache = cell.CACHE
    can = cache > 0 and checkpoint_every is None
    if gates == "store" and not can:
        why = "the Elman cell has no gates" if cache == 0 else "checkpoint_every recomputes its segments"
        raise ValueError(f"gates='store': {why}")
    if gates == "auto":
        elements = t_len * batch * cache * sum(spec.hidden_sizes) * spec.num_directions
        return can and cell.STORE_FROM <= elements <= STORE_ELEMENTS
    return gates == "store"


def block_width(spec: RNNSpec) -> int:
    """The widest per-step buffer of a block: G*N1 (a cell's gates; N1 for the Elman cell) or M."""
    return max(max(spec.hidden_sizes) * cells.get(spec.cell).GATES, spec.output_size)


def layer_backward(
    w11: Array,
    activation: str,
    hs: Array,
    dhs_above: Array,
    valid: Array | None,
    *,
    dh_init: Array | None = None,
    with_norms: bool = True,
    unroll: int = 1,
    recurrence: str = "scan",
) -> tuple[Array, Array, Array | None]:
    """The reverse recurrence of one Elman layer (one direction) over a run of steps, in its own scan
    time: the loop that ``cells.elman.reverse_recurrence`` states, as a ``lax.scan`` or as one kernel.

    Args:
      w11: [N1, N1] W11.
      activation: f1's name.
      hs: [T, B, N1] h(t) from the forward scan.
      dhs_above: [T, B, N1] gradient reaching h(t) from outside the recurrence.
      valid: [T, B] booleans or None.
      dh_init: [B, N1] the recurrent gradient entering from beyond the last step (dZ1(T) W11^T);
        zeros when None. The block and segment scans pass the later block's carry.
      with_norms: also return the norm of dh(t) (the diagnostics); skipped when False.
      recurrence: "scan" (this ``lax.scan``) or "pallas" (``kernels.reverse_recurrence``: the same
        loop as one kernel launch).

    Returns:
      (dz1s [T, B, N1], dh_m1 [B, N1], dh_norm [T, B] the norm of dh(t) per sequence, or None).
    """
    if recurrence == "pallas":
        dz1s, dh_m1, dh_norm = kernels.reverse_recurrence(w11, activation, hs, dhs_above, valid, dh_init)
        return dz1s, dh_m1, dh_norm if with_norms else None
    return elman.reverse_recurrence(
        w11, activation, hs, dhs_above, valid, dh_init, with_norms=with_norms, unroll=unroll
    )


def _flat(a: Array) -> Array:
    return a.reshape(-1, a.shape[-1])  # [T*B, F]


def layer_weight_grads(xs: Array, h0: Array, hs: Array, dz1s: Array) -> LayerParams:
    """dW1 = sum_t X(t)^T dZ1(t), dW11 = sum_t h(t-1)^T dZ1(t), db1 = sum_t dZ1(t), as single matmuls.

    xs: [C, B, N_in], h0: [B, N1] the state before the first step, hs: [C, B, N1], dz1s: [C, B, N1],
    all in the layer's scan time. (The Elman cell's ``weight_grads``; every cell has its own.)
    """
    hs_tm1 = jnp.concatenate([h0[None], hs[:-1]], axis=0)  # [C, B, N1] h(t-1)
    return elman.weight_grads(None, xs, hs_tm1, dz1s, dz1s)  # type: ignore[arg-type]


def cell_backward(
    layer,
    activation: str,
    xs: Array,
    s_in: Array,
    ss: Array,
    dhs_above: Array,
    valid: Array | None,
    *,
    ds_init: Array | None,
    with_norms: bool,
    unroll: int,
    recurrence: str = "scan",
    cache: Array | None = None,
):
    """One layer's BPTT over a run of C steps (scan time), for any cell: its reverse recurrence
    (``cell.reverse``, or the Elman kernel) and its "+=" weight-gradient sums over the C steps.

    Args:
      layer: the cell's parameters (their type names the cell).
      xs: [C, B, N_in] the layer's input; s_in: [B, W] the state entering the first step;
      ss: [C, B, W] the states; dhs_above: [C, B, N1]; valid: [C, B] or None;
      ds_init: [B, W] the carry entering from beyond the last step (None: zeros).
      cache: [C, B, CACHE N1] a gated cell's stored gates (None: the cell recomputes them).

    Returns:
      (grads (the cell's NamedTuple), ds(-1) [B, W], dA [C, B, G N1], ||dh(t)|| [C, B] or None).
    """
    cell = cells.of(layer)
    s_tm1s = jnp.concatenate([s_in[None], ss[:-1]], axis=0)  # [C, B, W] s(t-1)
    if recurrence == "pallas":  # the Elman cell only (kernels.resolve)
        das, ds_m1, norms = kernels.reverse_recurrence(layer.w11, activation, ss, dhs_above, valid, ds_init)
        dvs, norms = das, norms if with_norms else None
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
            with_norms=with_norms,
            unroll=unroll,
            cache=cache,
        )
    return cell.weight_grads(layer, xs, s_tm1s, das, dvs), ds_m1, das, norms


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


def _entering_states(h0: Array, hs_b: Array) -> Array:
    """[n, B, N1]: h(t-1) entering each block (h0 for the first, the previous block's last state)."""
    return jnp.concatenate([h0[None], hs_b[:-1, -1]], axis=0)


def layer_backward_blocked(
    layer,
    activation: str,
    xs: Array,
    hs: Array,
    h0: Array,
    dhs_above: Array,
    valid: Array | None,
    block_size: int,
    *,
    want_dx: bool = True,
    with_norms: bool = True,
    unroll: int = 1,
    recurrence: str = "scan",
    ds_last: Array | None = None,
    cache: Array | None = None,
):
    """One layer's BPTT given the gradient from above for all t, block by block (scan time).

    A reverse scan over blocks of C steps carries ds (dh, and dc for the LSTM) and the weight-gradient
    sums; per block it runs ``cell_backward`` over the C steps.

    Args:
      layer: the cell's parameters (Elman: W1 [N_in, N1], W11 [N1, N1], b1 [N1]).
      xs: [T, B, N_in] the layer's input; hs: [T, B, W] its states; h0: [B, W] the state before step 0.
      dhs_above: [T, B, N1]; valid: [T, B] or None. T must be a multiple of block_size.
      ds_last: [B, W] the gradient reaching the state after the last step from outside (a
        differentiated final carry), entering the reverse recurrence as its first carry; None: 0.
      cache: [T, B, CACHE N1] a gated cell's stored gates (scan time), or None: recomputed per block.

    Returns:
      (grads, ds_m1 [B, W], dxs [T, B, N_in] = dA(t) Wx^T (Elman: dZ1(t) W1^T) or None, dh_norm [T, B] or None).
    """
    c = block_size
    hs_b = _blocks(hs, c)
    zero = jax.tree_util.tree_map(jnp.zeros_like, layer)

    cell = cells.of(layer)

    def body(carry, blk):
        dh, g = carry
        x_blk, h_blk, h_in, above_blk, valid_blk, cache_blk = blk
        g_blk, dh, das, dh_norm = cell_backward(
            layer,
            activation,
            x_blk,
            h_in,
            h_blk,
            above_blk,
            valid_blk,
            ds_init=dh,
            with_norms=with_norms,
            unroll=unroll,
            recurrence=recurrence,
            cache=cache_blk,
        )
        g = _tree_add(g, g_blk)
        dx = cell.input_grad(layer, das) if want_dx else None  # [C, B, N_in]
        return (dh, g), (dx, dh_norm)

    blk_in = (
        _blocks(xs, c),
        hs_b,
        _entering_states(h0, hs_b),
        _blocks(dhs_above, c),
        _blocks(valid, c),
        _blocks(cache, c),
    )
    ds0 = jnp.zeros_like(h0) if ds_last is None else ds_last
    (dh_m1, grads), (dxs, dh_norm) = lax.scan(body, (ds0, zero), blk_in, reverse=True)
    return grads, dh_m1, _unblock(dxs), _unblock(dh_norm)


def stack_backward(
    params: RNNParams,
    spec: RNNSpec,
    traces: tuple[scan.LayerTrace, ...],
    h0: tuple[Array, ...],
    lengths: Array | None,
    dmerged_top: Array,
    *,
    with_norms: bool = True,
    with_dxs: bool = True,
    unroll: int = 1,
    block_size: int | None = None,
    recurrence: str = "scan",
    ds_last: tuple[Array, ...] | None = None,
):
    """BPTT through the whole stack given dDIV/d(top merged states) for all t, top layer first.

    The path for bidirectional networks and for ``vjp.rnn_states``: the gradient handed from layer
    to layer is a whole-sequence array (see the module docstring); each layer's reverse recurrence
    and weight-gradient sums run block by block (``layer_backward_blocked``).

    Args:
      traces: the forward pass's ``scan.run_stack`` output.
      h0: L*D entries [B, N1].
      dmerged_top: [T, B, N_top] dDIV/d(top layer's merged states), in input time.
      with_norms: compute dh_norms (else None).
      with_dxs: compute dxs = dDIV/dX (else None).
      block_size: C, a divisor of T; None: T.
      ds_last: L*D entries [B, W] (internal layout), dDIV/d(each entry's final state) from outside,
        or None (the final states are not used).

    Returns:
      (layers grads, reverse_layers grads, dxs [T, B, N], dh0 (L*D), dh_norms [T, L*D]).
    """
    t_len = dmerged_top.shape[0]
    c = t_len if block_size is None else block_size
    valid = scan.valid_mask(lengths, t_len)
    d = spec.num_directions
    n_layers = spec.num_layers
    g_layers: list[Any] = [None] * n_layers
    g_reverse: list[Any] = [None] * n_layers
    dh0: list[Any] = [None] * (n_layers * d)
    norms: list[Any] = [None] * (n_layers * d)
    dmerged: Any = dmerged_top
    for k in reversed(range(n_layers)):  # a loop over layers, not time
        tr = traces[k]
        n1 = spec.hidden_sizes[k]
        if not spec.bidirectional:
            parts: tuple[Array, ...] = (dmerged,)
        elif spec.merge == "concat":
            parts = (dmerged[..., :n1], dmerged[..., n1:])
        else:
            parts = (dmerged, dmerged)
        dinputs = None
        want_dx = k > 0 or with_dxs
        for j in range(d):
            layer = params.layers[k] if j == 0 else params.reverse_layers[k]
            above = parts[j] if j == 0 else scan.reverse_padded(parts[j], lengths)  # scan time
            xs_scan = tr.inputs if j == 0 else scan.reverse_padded(tr.inputs, lengths)
            grads, dh_m1, dx, dh_norm = layer_backward_blocked(
                layer,
                spec.activation,
                xs_scan,
                tr.states[j],
                h0[k * d + j],
                above,
                valid,
                c,
                want_dx=want_dx,
                with_norms=with_norms,
                unroll=unroll,
                recurrence=recurrence,
                ds_last=None if ds_last is None else ds_last[k * d + j],
                cache=None if tr.caches is None else tr.caches[j],
            )
            if want_dx:
                dx = dx if j == 0 else scan.reverse_padded(dx, lengths)  # input time
                dinputs = dx if dinputs is None else dinputs + dx
            if with_norms:
                dh_norm = dh_norm if j == 0 else scan.reverse_padded(dh_norm, lengths)
                norms[k * d + j] = jnp.mean(dh_norm, axis=1)  # [T]
            (g_layers if j == 0 else g_reverse)[k] = grads
            dh0[k * d + j] = dh_m1
        dmerged = dinputs
    dh_norms = jnp.stack(norms, axis=1) if with_norms else None
    return tuple(g_layers), tuple(g for g in g_reverse if g is not None), dmerged, tuple(dh0), dh_norms


def _readout(params: RNNParams, spec: RNNSpec, top: Array):
    z2s = top @ params.readout.w2 + params.readout.b2  # [T, B, M], Z2(t) = h(t) W2 + b2
    return z2s, activations.output(spec.output_activation, z2s)


def readout_backward(params: RNNParams, spec: RNNSpec, top: Array, targets: Array, w: Array, *, generic: bool = False):
    """The output layer, forward and backward, for a run of steps (a block or the whole sequence).

    Args:
      top: [C, B, N_top] the readout's input (the top layer's merged states, after any dropout).
      targets: [C, B] or [C, B, M]; w: [C, B] effective weights.

    Returns:
      (DIV of these steps, readout grads, dDIV/dtop [C, B, N_top] = dZ2(t) W2^T).
    """
    z2s, ys = _readout(params, spec, top)
    div = losses.total(losses.divergence(spec.divergence, z2s, ys, targets), w)
    dz2s = losses.output_grad(spec.divergence, spec.output_activation, z2s, ys, targets, w, generic=generic)
    g_readout = ReadoutParams(_flat(top).T @ _flat(dz2s), jnp.sum(dz2s, axis=(0, 1)))
    return div, g_readout, dz2s @ params.readout.w2.T


class _Carry(NamedTuple):
    """What the reverse scan over blocks carries (unidirectional stacks)."""

    dh: tuple[Array, ...]  # L entries [B, N1]: dZ1(t+1) W11^T entering the block from the right
    layers: tuple[LayerParams, ...]  # the weight-gradient sums so far
    readout: ReadoutParams
    div: Array  # DIV so far


def _zero_carry(params: RNNParams, h0: tuple[Array, ...], dtype) -> _Carry:
    zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
    return _Carry(
        tuple(jnp.zeros_like(h) for h in h0), zeros(params.layers), zeros(params.readout), jnp.zeros((), dtype)
    )


def _stack_backward_fused(
    params,
    spec,
    xs,
    hs,
    h0,
    valid,
    targets,
    w,
    output_mask,
    carry: _Carry,
    c: int,
    *,
    generic: bool,
    with_norms: bool,
    with_dxs: bool,
    unroll: int,
    recurrence: str = "scan",
    caches: tuple[Array, ...] | None = None,
):
    """Unidirectional stacks: readout and every layer's BPTT together, block by block (module doc).

    xs: [T', B, N]; hs: L entries [T', B, N1]; h0: L entries [B, N1] (the states before step 0);
    caches: None, or L entries [T', B, CACHE N1]: the gated cells' stored gates (``gates="store"``);
    valid: [T', B] or None; targets, w, output_mask: [T', ...]; T' a multiple of c. ``carry`` enters
    from beyond the last step (zeros, or a later segment's). Returns (carry at step 0, dxs [T', B, N]
    or None, norms [T', L] or None).
    """
    n_layers = spec.num_layers
    hs_b = tuple(_blocks(h, c) for h in hs)
    h_in = tuple(_entering_states(h0[k], hs_b[k]) for k in range(n_layers))

    cell = cells.get(spec.cell)

    def body(carry: _Carry, blk):
        x_blk, h_blks, h_ins, valid_blk, tg_blk, w_blk, mask_blk, cache_blks = blk
        top = cell.hidden(h_blks[-1])  # h(t) of the top layer's state
        top = top if mask_blk is None else top * mask_blk  # dropout on the readout's input
        div, g_readout, above = readout_backward(params, spec, top, tg_blk, w_blk, generic=generic)
        if mask_blk is not None:
            above = above * mask_blk
        dh, g_layers = list(carry.dh), list(carry.layers)
        norms: list[Any] = [None] * n_layers
        for k in reversed(range(n_layers)):  # a loop over layers, not time
            layer = params.layers[k]
            x_k = x_blk if k == 0 else cell.hidden(h_blks[k - 1])
            g_k, dh[k], das, dh_norm = cell_backward(
                layer,
                spec.activation,
                x_k,
                h_ins[k],
                h_blks[k],
                above,
                valid_blk,
                ds_init=dh[k],
                with_norms=with_norms,
                unroll=unroll,
                recurrence=recurrence,
                cache=None if cache_blks is None else cache_blks[k],
            )
            g_layers[k] = _tree_add(g_layers[k], g_k)
            if k > 0 or with_dxs:
                above = cell.input_grad(layer, das)  # [C, B, N_in]: to layer k-1 (or dX)
            if dh_norm is not None:  # with_norms
                norms[k] = jnp.mean(dh_norm, axis=1)  # [C]
        new = _Carry(tuple(dh), tuple(g_layers), _tree_add(carry.readout, g_readout), carry.div + div)
        return new, (above if with_dxs else None, jnp.stack(norms, axis=1) if with_norms else None)

    blk_in = (
        _blocks(xs, c),
        hs_b,
        h_in,
        _blocks(valid, c),
        _blocks(targets, c),
        _blocks(w, c),
        _blocks(output_mask, c),
        None if caches is None else tuple(_blocks(a, c) for a in caches),
    )
    carry, (dxs, norms) = lax.scan(body, carry, blk_in, reverse=True)
    return carry, _unblock(dxs), _unblock(norms)


def _largest_divisor_at_most(n: int, c: int) -> int:
    return max(d for d in range(1, min(n, c) + 1) if n % d == 0)


def _segments(
    params,
    spec,
    xs,
    targets,
    w,
    valid,
    lengths,
    h0,
    every,
    c,
    *,
    generic,
    with_norms,
    with_dxs,
    unroll,
    recurrence="scan",
):
    """checkpoint_every: states stored every ``every`` steps, each segment recomputed in the backward.

    The forward pass keeps only the state entering each segment of k steps (T/k boundary states per
    layer); the backward pass walks the segments from the last to the first, re-runs the forward
    scans inside the segment from its boundary state and runs the blocked BPTT over those k steps,
    carrying dh and the weight-gradient sums from segment to segment. Stored activations grow like
    T/k + k instead of T, for about one extra forward pass of compute. xs etc. are already padded
    to a multiple of k.
    """
    k = every
    n_seg = xs.shape[0] // k
    c_seg = _largest_divisor_at_most(k, c)
    seg = lambda a: None if a is None else a.reshape((n_seg, k) + a.shape[1:])
    if lengths is None:
        lens_s = None
    else:
        starts = jnp.arange(n_seg) * k
        lens_s = jnp.clip(lengths[None, :] - starts[:, None], 0, k).astype(jnp.int32)  # [S, B]

    def seg_forward(h, inp):  # h: L entries [B, N1], the state entering the segment
        x_seg, lens = inp
        traces = scan.run_stack(params, spec, x_seg, h, lens, unroll=unroll, block_size=c_seg, recurrence=recurrence)
        return tuple(tr.states[0][-1] for tr in traces), h

    h_last, boundaries = lax.scan(seg_forward, h0, (seg(xs), lens_s))  # boundaries: L entries [S, B, N1]

    def seg_backward(carry, inp):
        x_seg, tg_seg, w_seg, valid_seg, lens, h_start = inp
        traces = scan.run_stack(
            params, spec, x_seg, h_start, lens, unroll=unroll, block_size=c_seg, recurrence=recurrence
        )
        hs = tuple(tr.states[0] for tr in traces)  # recomputed k steps
        carry, dxs, norms = _stack_backward_fused(
            params,
            spec,
            x_seg,
            hs,
            h_start,
            valid_seg,
            tg_seg,
            w_seg,
            None,
            carry,
            c_seg,
            generic=generic,
            with_norms=with_norms,
            with_dxs=with_dxs,
            unroll=unroll,
            recurrence=recurrence,
        )
        return carry, (dxs, norms)

    init = _zero_carry(params, h0, xs.dtype)
    carry, (dxs, norms) = lax.scan(
        seg_backward, init, (seg(xs), seg(targets), seg(w), seg(valid), lens_s, boundaries), reverse=True
    )
    return carry, h_last, _unblock(dxs), _unblock(norms)


@functools.partial(jax.jit, static_argnames=("spec", "unroll", "recurrence"))
def _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll, recurrence="auto"):
    """(DIV, final states): the plain forward computation that ``jax.grad`` differentiates."""
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths)
    targets, weights = checks.check_targets(spec, targets, weights, xs.shape[0], xs.shape[1])
    output_mask = checks.check_output_mask(spec, output_mask, xs.shape[0], xs.shape[1])
    rec = kernels.resolve(recurrence, spec.hidden_sizes, xs.dtype, cell=spec.cell)
    traces = scan.run_stack(params, spec, xs, h0, lengths, unroll=scan.resolve_unroll(unroll), recurrence=rec)
    top = traces[-1].merged
    if output_mask is not None:
        top = top * output_mask
    z2s, ys = _readout(params, spec, top)
    w = losses.effective_weights(weights, lengths, xs.shape[0], xs.shape[1], xs.dtype)
    h_last = spec.public_states(tuple(h[-1] for tr in traces for h in tr.states))
    div = losses.total(losses.divergence(spec.divergence, z2s, ys, targets), w)
    return checks.poison(checks.value_flags(spec, targets, lengths, xs.shape[0]), (div, h_last))


_STATIC = (
    "spec",
    "generic",
    "unroll",
    "block_size",
    "checkpoint_every",
    "diagnostics",
    "with_dxs",
    "recurrence",
    "gates",
)


def _bptt(
    params,
    xs,
    targets,
    weights,
    lengths,
    h0,
    output_mask,
    *,
    spec,
    generic,
    unroll,
    block_size,
    checkpoint_every,
    diagnostics,
    with_dxs,
    recurrence,
    gates="auto",
):
    # Shape and dtype checks: they run when this function is traced, i.e. once per input signature.
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths)
    targets, weights = checks.check_targets(spec, targets, weights, xs.shape[0], xs.shape[1])
    output_mask = checks.check_output_mask(spec, output_mask, xs.shape[0], xs.shape[1])
    t_len, batch, _ = xs.shape
    bad = checks.value_flags(spec, targets, lengths, t_len)
    rec = kernels.resolve(recurrence, spec.hidden_sizes, xs.dtype, cell=spec.cell)
    unroll = scan.resolve_unroll(unroll)
    store = resolve_gates(gates, spec, t_len, batch, checkpoint_every)
    if block_size is None and rec == "pallas":
        block_size = t_len  # the kernels run all T steps in one launch; blocks are for CPU caches
    c = min(block_size or auto_block_size(t_len, batch, block_width(spec)), t_len)
    unit = checkpoint_every or c  # the time axis is padded to a multiple of this
    n_units = math.ceil(t_len / unit)
    pad = n_units * unit - t_len
    w = losses.effective_weights(weights, lengths, t_len, batch, xs.dtype)  # [T, B]
    if pad and lengths is None:
        lengths = jnp.full((batch,), t_len, jnp.int32)  # the padded steps hold the state, weigh 0
    xs_p, tg_p, w_p = scan.pad_time(xs, pad), scan.pad_time(targets, pad), scan.pad_time(w, pad)
    mask_p = scan.pad_time(output_mask, pad)
    valid = scan.valid_mask(lengths, t_len + pad)
    opts = dict(generic=generic, with_norms=diagnostics, with_dxs=with_dxs, unroll=unroll, recurrence=rec)
    if checkpoint_every is not None:
        carry, h_last, dxs, norms = _segments(
            params, spec, xs_p, tg_p, w_p, valid, lengths, h0, checkpoint_every, c, **opts
        )
        div, grads, dh0 = carry.div, RNNParams(carry.layers, (), carry.readout), carry.dh
    else:
        traces = scan.run_stack(
            params, spec, xs_p, h0, lengths, unroll=unroll, block_size=c, recurrence=rec, store=store
        )
        h_last = tuple(h[-1] for tr in traces for h in tr.states)
        if not spec.bidirectional:
            hs = tuple(tr.states[0] for tr in traces)
            caches = tuple(tr.caches[0] for tr in traces) if store else None
            zero = _zero_carry(params, h0, xs.dtype)
            carry, dxs, norms = _stack_backward_fused(
                params, spec, xs_p, hs, h0, valid, tg_p, w_p, mask_p, zero, c, caches=caches, **opts
            )
            div, grads, dh0 = carry.div, RNNParams(carry.layers, (), carry.readout), carry.dh
        else:
            top = traces[-1].merged  # [T', B, N_top], whole sequence: both directions at each t
            if mask_p is not None:
                top = top * mask_p
            div, g_readout, dtop = readout_backward(params, spec, top, tg_p, w_p, generic=generic)
            if mask_p is not None:
                dtop = dtop * mask_p
            g_layers, g_reverse, dxs, dh0, norms = stack_backward(
                params,
                spec,
                traces,
                h0,
                lengths,
                dtop,
                with_norms=diagnostics,
                with_dxs=with_dxs,
                unroll=unroll,
                block_size=c,
                recurrence=rec,
            )
            grads = RNNParams(g_layers, g_reverse, g_readout)
    if pad:
        dxs = None if dxs is None else dxs[:t_len]
        norms = None if norms is None else norms[:t_len]
    div, grads = checks.poison(bad, (div, grads))
    dc_norms = None
    if norms is not None and norms.ndim == 3:  # the LSTM's cells give (||dh(t)||, ||dc(t)||) per step
        norms, dc_norms = norms[..., 0], norms[..., 1]
    aux = BPTTAux(spec.public_states(dh0), dxs if with_dxs else None, norms, spec.public_states(h_last), dc_norms)
    return div, grads, aux


@functools.lru_cache(maxsize=256)
def _compiled_bptt(spec, generic, unroll, block_size, checkpoint_every, diagnostics, with_dxs, recurrence, gates):
    """``_bptt`` jitted for one static configuration, called with array arguments only: the jit's fast
    C++ dispatch then skips hashing keyword statics on every call (measured ~10 us a call)."""
    values = (spec, generic, unroll, block_size, checkpoint_every, diagnostics, with_dxs, recurrence, gates)
    static = dict(zip(_STATIC, values))
    return jax.jit(functools.partial(_bptt, **static))


def loss(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    lengths: Array | None = None,
    h0: tuple[Array, ...] | None = None,
    output_mask: Array | None = None,
    unroll: int | None = None,
    recurrence: str = "auto",
    check_values: bool | None = None,
    check_finite: bool = False,
) -> Array:
    """DIV = mean over the batch of sum over t of w(t) Div(Y(t), D(t)). Differentiable by jax.grad.

    Args:
      params, spec: the network.
      xs: [T, B, N] inputs.
      targets: cross_entropy: [T, B] integer classes in [0, M) or [T, B, M] probabilities;
        otherwise [T, B, M] floats D(t).
      weights: [T, B] w(t) ("removes" outputs where 0; many-to-one puts 1 at the last valid step
        only). Ones when None. Steps t >= lengths[b] always weigh 0.
      lengths: [B] valid steps per sequence.
      h0: L*D entries [B, N1] (order layer * D + direction), zeros when None.
      output_mask: [T, B, N_top] multiplies the top layer's merged states before the readout
        (dropout on the outputs: zeros and 1/(1-p)); None for no dropout.
      unroll: scan steps per loop iteration (``lax.scan``'s unroll); None picks 1 on a CPU and
        ``scan.GPU_UNROLL`` (8) on a GPU, as measured (benchmarks/README.md).
      recurrence: "scan" (``lax.scan``), "pallas" (the fused kernels of ``bptt_jax.kernels``, one launch
        per layer and direction for all T; interpret mode on a CPU) or "auto" (the kernels on a GPU
        where they apply, the scans elsewhere). An explicit "pallas" that cannot apply raises.
      check_values: how class indices and lengths are range-checked (``bptt_jax.checks``): None reads
        host arrays only, True also reads device arrays back (a host sync), False never; out-of-range
        values always make the result NaN in the graph.
      check_finite: raise ValueError on NaN or inf in xs, h0 or params.

    Returns:
      The scalar DIV.
    """
    lengths, weights = checks.host_checks(spec, xs, targets, weights, lengths, check_values)
    if check_finite:
        checks.check_finite_inputs(xs, h0, params)
    return _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll, recurrence)[0]


def loss_and_state(
    params,
    spec,
    xs,
    targets,
    *,
    weights=None,
    lengths=None,
    h0=None,
    output_mask=None,
    unroll: int | None = None,
    recurrence: str = "auto",
):
    """(DIV, final states) — ``loss`` plus the L*D final states, for ``jax.value_and_grad(...,
    has_aux=True)`` in truncated BPTT (one forward pass gives both). Arguments as ``loss``."""
    lengths, weights = checks.host_checks(spec, xs, targets, weights, lengths, None)
    return _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll, recurrence)


def bptt(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    lengths: Array | None = None,
    h0: tuple[Array, ...] | None = None,
    output_mask: Array | None = None,
    generic: bool = False,
    unroll: int | None = None,
    block_size: int | None = None,
    checkpoint_every: int | None = None,
    diagnostics: bool = False,
    with_dxs: bool = False,
    recurrence: str = "auto",
    gates: str = "auto",
    check_values: bool | None = None,
    check_finite: bool = False,
) -> tuple[Array, RNNParams, BPTTAux]:
    """DIV and its gradient by the explicit BPTT over time blocks (arguments as ``loss``).

    The forward scans store h(t) only; the backward pass walks blocks of C steps from the last to
    the first (module docstring), carrying dh and the weight-gradient sums. The call is jitted:
    shape checks run once per input signature, value checks follow ``check_values``.

    Args:
      generic: form dDIV/dZ2 by the generic path (dDIV/dY times the full Jacobian for softmax)
        instead of the fused closed form; the two agree (tests show it).
      block_size: C, steps per time block; None picks ``auto_block_size`` (one block for small
        problems, cache-sized blocks for large ones). C = T is the whole-sequence computation. Any
        C >= 1 gives the same gradients.
      checkpoint_every: store the states only every k steps and recompute each k-step segment in
        the backward pass: memory ~ T/k + k instead of T, same gradients. Unidirectional networks
        without output_mask only.
      diagnostics: also compute ``aux.dh_norms`` = ||dDIV/dh(t)|| per step and layer (None otherwise).
        Off by default: the norm in every step of the reverse scans costs ~10% at small shapes.
      with_dxs: also compute ``aux.dxs`` = dDIV/dX [T, B, N] (one more matmul per step; None
        otherwise). ``aux.dh0`` and ``aux.h_last`` are always returned.
      recurrence: as ``loss``; with the kernels and no block_size the whole sequence is one block.
      gates: GRU and LSTM: "store" keeps the gate activations of the forward pass (4 N1 floats per
        step, example, layer and direction) for the backward pass; "recompute" keeps h(t) (and c(t))
        only and recomputes the gates per block with two block matmuls; "auto" stores while that
        cache holds at most ``STORE_ELEMENTS`` elements and, for the GRU, at least 2^16
        (``resolve_gates``). Same gradients either way. Not with checkpoint_every (its segments
        recompute); the Elman cell has nothing to store. Measured on a 2-core CPU at the larger
        benchmark shapes (benchmarks/gated_memory.py): temp memory 0.48-0.71x of ``jax.grad``
        through a plain scan stored, 0.14-0.50x recomputed, 0.16-0.34x recomputed with half the
        automatic ``block_size``, at 0.79-1.00x of the stored default's speed.

    Returns:
      (DIV, grads with exactly the structure of params, ``BPTTAux(dh0, dxs, dh_norms, h_last)``).
    """
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size: expected a positive int or None, got {block_size!r}")
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: expected a positive int or None, got {checkpoint_every!r}")
        if getattr(spec, "bidirectional", False):
            raise ValueError(
                "checkpoint_every: segment recomputation needs a unidirectional network (spec.bidirectional=True)"
            )
        if output_mask is not None:
            raise ValueError("checkpoint_every: cannot be combined with output_mask")
    if recurrence not in kernels.RECURRENCES:
        raise ValueError(f"recurrence: expected one of {list(kernels.RECURRENCES)}, got {recurrence!r}")
    lengths, weights = checks.host_checks(spec, xs, targets, weights, lengths, check_values)
    if check_finite:
        checks.check_finite_inputs(xs, h0, params)
    resolve_gates(gates, spec, 1, 1, checkpoint_every)  # a bad value or an impossible "store" fails here
    fn = _compiled_bptt(spec, generic, unroll, block_size, checkpoint_every, diagnostics, with_dxs, recurrence, gates)
    return fn(params, xs, targets, weights, lengths, h0, output_mask)
