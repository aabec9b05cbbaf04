"""Forward unrolling with ``lax.scan``: one layer, stacks, length-aware reversal, bidirectional.

Every scan here equals a plain Python loop over a cell's step (``bptt_jax.core.cells``; the Elman cell's
``cell.step``); each docstring states that loop. A layer's cell is the type of its parameters.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import cells, checks, kernels, native, precision
from bptt_jax.core.params import RNNParams, RNNSpec

Array = jax.Array


# Scan steps per loop iteration that ``unroll=None`` ("auto") picks: 1 on a CPU, GPU_UNROLL on a GPU.
# Measured on an H100 (docs/results/benchmarks.md, "On a GPU"): unroll 8 ran the explicit BPTT's scans
# 1.3-2.9x faster than unroll 1 at every benchmark shape (each loop iteration is a few kernel launches
# there); on the 2-core CPU unroll 1 is the fastest setting.
GPU_UNROLL = 8


def resolve_unroll(unroll: int | None, backend: str | None = None) -> int:
    """``lax.scan``'s unroll for a requested ``unroll``: a positive int as given, None by backend."""
    if unroll is None:
        return GPU_UNROLL if (backend or jax.default_backend()) == "gpu" else 1
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(
            f"unroll: expected a positive int or None (auto: 1 on a CPU, {GPU_UNROLL} on a GPU), got {unroll!r}"
        )
    return unroll


def reverse_padded(xs: Array, lengths: Array | None) -> Array:
    """Reverses each sequence's valid prefix in time and leaves its padding where it is.

    Args:
      xs: [T, B, ...] time-major batch.
      lengths: [B] valid steps per sequence (t < lengths[b] is valid), or None for all T.

    Returns:
      [T, B, ...] with out[t, b] = xs[lengths[b] - 1 - t, b] for t < lengths[b], xs[t, b] otherwise.
      The function is its own inverse. With lengths None it is ``xs[::-1]``.
    """
    if lengths is None:
        return xs[::-1]
    t_len = xs.shape[0]
    t = jnp.arange(t_len)[:, None]  # [T, 1]
    idx = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # [T, B]
    idx = idx.reshape(idx.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, idx, axis=0)


def valid_mask(lengths: Array | None, t_len: int) -> Array | None:
    """[T, B] booleans, True where t < lengths[b]; None when lengths is None."""
    if lengths is None:
        return None
    return jnp.arange(t_len)[:, None] < lengths[None, :]


def _unroll_whole(
    layer,
    activation: str,
    xs: Array,
    h0: Array,
    valid: Array | None,
    unroll: int,
    recurrence: str = "scan",
    store: bool = False,
    with_final: bool = False,
):
    """[T, B, W] states, or with ``store`` (a gated cell) the pair (states, gate caches [T, B, CACHE N1]);
    ``with_final``: the pair (that, the state after the last step [B, W])."""
    cell = cells.of(layer)
    xs = precision.rounded(xs, h0.dtype)
    if recurrence == "native" and cells.name_of(layer) == "lstm":  # float32 on the CPU (kernels.resolve)
        # h(t) and c(t) in two buffers, joined as [h | c] for the code that reads the states: XLA
        # folds the slices taken of the join (the next layer's input h(t), the reverse call's two
        # operands) back into the two buffers, so h(t) is not copied out of [h | c]. The final state
        # is joined from the two buffers' last rows: read as ss[-1], XLA would keep the whole join
        # as an array of its own for the two slices of its last row (6.25 MiB more temp memory at
        # (200, 64, 128, 256, 128), measured)
        out = native.forward("lstm", layer, xs, h0, valid, store, apart=True)  # it forms X Wx + bx itself
        (hs, cs), cache = out if store else (out, None)
        ss = jnp.concatenate([hs, cs], axis=-1)
        res = (ss, cache) if store else ss
        return (res, jnp.concatenate([hs[-1], cs[-1]], axis=-1)) if with_final else res
    if with_final:
        res = _unroll_whole(layer, activation, xs, h0, valid, unroll, recurrence, store)
        return res, (res[0] if store else res)[-1]
    if recurrence == "native" and cells.name_of(layer) != "elman":  # the GRU
        return native.forward(cells.name_of(layer), layer, xs, h0, valid, store)  # it forms X Wx + bx itself
    if recurrence == "native":  # the Elman cell in float32 on the CPU: one call per block
        return native.elman_forward_x(layer, activation, xs, h0, valid)  # it forms X W1 + b1 itself
    us = cell.project(layer, xs)  # [T, B, G N1], one matmul for all t
    if recurrence == "pallas":  # the Elman cell only (kernels.resolve)
        return kernels.forward_recurrence(layer.w11, activation, us, h0, valid)  # one kernel launch

    # Without the gate cache, a gated cell's A(t) enters the loop one gate block per array and is
    # joined again inside the step (XLA folds each slice of the join back to its own block): measured
    # on XLA:CPU (docs/results/benchmarks.md, "The gated forward scan"), the step that slices its gate
    # blocks out of one [T, B, G N1] array ran up to 2.2x slower (GRU; LSTM 1.5x, but 0.7-1.0x at
    # the smallest and the largest shapes). The step that also writes its gate cache ran 0.77-1.05x
    # as fast split, so it keeps the one array.
    n_parts = 1 if store else cell.GATES
    width = us.shape[-1] // n_parts
    parts = (us,) if n_parts == 1 else tuple(us[..., k * width : (k + 1) * width] for k in range(n_parts))

    def body(h_tm1, inp):
        u_parts, valid_t = inp
        u_t = u_parts[0] if len(u_parts) == 1 else jnp.concatenate(u_parts, axis=-1)
        if store:
            h_t, cache_t = cell.recur_cache(layer, activation, h_tm1, u_t)
        else:
            h_t, cache_t = cell.recur(layer, activation, h_tm1, u_t), None
        if valid_t is not None:
            h_t = jnp.where(valid_t[:, None], h_t, h_tm1)  # a padded step's cache is never read
        return h_t, (h_t, cache_t)

    _, (hs, caches) = lax.scan(body, h0, (parts, valid), unroll=unroll)
    return (hs, caches) if store else hs


@overload
def pad_time(a: Array, pad: int, value=0) -> Array: ...
@overload
def pad_time(a: None, pad: int, value=0) -> None: ...
def pad_time(a: Array | None, pad: int, value=0) -> Array | None:
    """Appends ``pad`` steps filled with ``value`` along axis 0 (time); None stays None."""
    if a is None or pad == 0:
        return a
    return jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], value, a.dtype)], axis=0)


def unroll_layer(
    layer,
    activation: str,
    xs: Array,
    h0: Array,
    valid: Array | None = None,
    *,
    unroll: int = 1,
    block_size: int | None = None,
    recurrence: str = "scan",
    store: bool = False,
    with_final: bool = False,
):
    """Runs one layer (one direction) over time, with the input projection hoisted out of the scan.

    Equals the Python loop (tests/reference.py keeps it)::

        h = h0
        for t in range(T):
            h_new = cell.recur(layer, activation, h, cell.project(layer, xs[t]))   # one step
            h = h_new if valid is None else where(valid[t], h_new, h)   # padding holds the state
            hs[t] = h

    (for the Elman cell, ``cell.step(layer, activation, h, xs[t])``). ``h`` is the cell's state
    [B, W]: h, or [h | c] for the LSTM.

    With ``block_size=C < T`` the time axis is cut into blocks of C steps: an outer scan over the
    blocks forms the projection X(t) W1 + b1 for the block's C steps only ([C, B, N1] instead of
    [T, B, N1]) and runs the inner scan over them. The result is the same loop.

    Args:
      layer: the layer's parameters (Elman: W1 [N, N1], W11 [N1, N1], b1 [N1]; or a gated cell's).
      activation: f1's name (the Elman cell's).
      xs: [T, B, N] inputs.
      h0: [B, W] the state before step 0 (W = N1, or 2 N1 for the LSTM).
      valid: [T, B] booleans, or None when every step is valid.
      unroll: steps per scan iteration (``lax.scan``'s unroll).
      block_size: C, steps per block; None (or >= T) projects all T steps at once.
      recurrence: "scan" (``lax.scan``) or "pallas" (``kernels.forward_recurrence``), resolved.
      store: a gated cell also returns its gate cache per step (``cell.recur_cache``), for a
        backward pass that reads the gates instead of recomputing them.
      with_final: also the state after the last step, hs[T-1] (see ``_unroll_whole``).

    Returns:
      [T, B, W] the state for every t; hs[T-1] is the state at the last valid step. With ``store``:
      (that, caches [T, B, CACHE N1]). With ``with_final``: (that, hs[T-1] [B, W]).
    """
    t_len = xs.shape[0]
    if block_size is None or block_size >= t_len:
        return _unroll_whole(layer, activation, xs, h0, valid, unroll, recurrence, store, with_final)
    c = block_size
    n_blocks = -(-t_len // c)
    pad = n_blocks * c - t_len
    if pad and valid is None:
        valid = jnp.ones(xs.shape[:2], bool)
    xs_b = jnp.reshape(pad_time(xs, pad), (n_blocks, c) + xs.shape[1:])  # [nb, C, B, N]
    valid_b = None if valid is None else jnp.reshape(pad_time(valid, pad, False), (n_blocks, c) + valid.shape[1:])

    def block(h_in, inp):
        x_blk, valid_blk = precision.per_block(inp, (xs, valid))
        out = _unroll_whole(layer, activation, x_blk, h_in, valid_blk, unroll, recurrence, store)  # [C, B, W]
        return (out[0] if store else out)[-1], precision.hide(out)

    _, out = lax.scan(block, h0, precision.hide((xs_b, valid_b)))
    out = precision.reveal(out, h0.dtype)  # [nb, C, B, W] (and [nb, C, B, CACHE N1])
    whole = lambda a: a.reshape((n_blocks * c,) + a.shape[2:])[:t_len]
    res = (whole(out[0]), whole(out[1])) if store else whole(out)
    return (res, (res[0] if store else res)[-1]) if with_final else res


class LayerTrace(NamedTuple):
    """What the forward pass keeps of one layer for the backward pass."""

    inputs: Array  # [T, B, N_in] the layer's input, in input time
    states: tuple[Array, ...]  # D entries [T, B, W], each in its own scan's time (reverse: reversed)
    merged: Array  # [T, B, N_out] the merged states, in input time
    caches: tuple[Array, ...] | None = None  # with run_stack's store: D entries [T, B, CACHE N1]
    finals: tuple[Array, ...] | None = None  # D entries [B, W]: each states entry's last step (run_stack's)


def merge(spec: RNNSpec, h_fwd: Array, h_rev: Array | None) -> Array:
    """Merges the two directions' states at every t: concat (forward first) or sum."""
    if h_rev is None:
        return h_fwd
    if spec.merge == "concat":
        return jnp.concatenate([h_fwd, h_rev], axis=-1)  # [T, B, 2 N1]
    return h_fwd + h_rev


def run_stack(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    h0: tuple[Array, ...],
    lengths: Array | None,
    *,
    unroll: int = 1,
    block_size: int | None = None,
    recurrence: str = "scan",
    store: bool = False,
) -> tuple[LayerTrace, ...]:
    """Runs every layer bottom to top; layer k reads the merged states of layer k-1.

    The reverse net of a bidirectional layer is the same scan run over
    ``reverse_padded(inputs, lengths)``; its states are re-aligned to input time before merging.

    Args:
      h0: L*D entries [B, W] (internal states) in the order layer * D + direction.
      block_size: C for ``unroll_layer`` (input projections per block of C steps); None: all T.
      recurrence: "scan" or "pallas" (already resolved by ``kernels.resolve``).
      store: gated cells only: keep each layer's and direction's gate cache (``LayerTrace.caches``,
        in each direction's scan time, like ``states``).

    Returns:
      One ``LayerTrace`` per layer.
    """
    if store and cells.get(spec.cell).CACHE == 0:
        raise ValueError("run_stack: store keeps the gates of gated cells only")
    valid = valid_mask(lengths, xs.shape[0])
    d = spec.num_directions
    traces = []
    inputs = xs
    for k in range(spec.num_layers):  # a loop over layers, not time
        hs_f = unroll_layer(
            params.layers[k],
            spec.activation,
            inputs,
            h0[k * d],
            valid,
            unroll=unroll,
            block_size=block_size,
            recurrence=recurrence,
            store=store,
            with_final=True,
        )
        hs_f, final_f = hs_f
        finals: tuple[Array, ...] = (final_f,)
        caches: tuple[Array, ...] | None = None
        if store:
            hs_f, cache_f = hs_f
            caches = (cache_f,)
        states: tuple[Array, ...] = (hs_f,)
        hs_r_input_time = None
        if spec.bidirectional:
            hs_r = unroll_layer(
                params.reverse_layers[k],
                spec.activation,
                reverse_padded(inputs, lengths),
                h0[k * d + 1],
                valid,
                unroll=unroll,
                block_size=block_size,
                recurrence=recurrence,
                store=store,
                with_final=True,
            )
            hs_r, final_r = hs_r
            finals = (final_f, final_r)
            if store:
                hs_r, cache_r = hs_r
                caches = (cache_f, cache_r)
            states = (hs_f, hs_r)
            hs_r_input_time = reverse_padded(hs_r, lengths)
        hidden = cells.get(spec.cell).hidden  # h(t) of the state: what the next layer reads
        merged = merge(spec, hidden(hs_f), None if hs_r_input_time is None else hidden(hs_r_input_time))
        traces.append(LayerTrace(inputs, states, merged, caches, finals))
        inputs = merged
    return tuple(traces)


def last_states(traces: tuple[LayerTrace, ...]) -> tuple[Array, ...]:
    """Each (layer, direction) entry's state after its last scan step (internal layout [B, W]): the
    forward net's at the last valid step, the reverse net's at t = 0 (padding holds the state)."""
    return tuple(s for tr in traces for s in _finals(tr))


def _finals(tr: LayerTrace) -> tuple[Array, ...]:
    """The trace's final states (``LayerTrace.finals``; a trace made without them: each states entry's last step)."""
    return tr.finals if tr.finals is not None else tuple(h[-1] for h in tr.states)


def default_h0(spec: RNNSpec, batch: int, dtype) -> tuple[Array, ...]:
    """Zeros for every (layer, direction): L*D internal states [B, W] (W = N1, or 2 N1 for the LSTM)."""
    return tuple(jnp.zeros((batch, w), dtype) for w in spec.state_widths())


class ForwardOutput(NamedTuple):
    """What ``forward`` returns. Per-(layer, direction) tuples are ordered layer * D + direction."""

    ys: Array  # [T, B, M] Y(t) = f2(Z2(t))
    hs: tuple[Array, ...]  # L*D entries [T, B, N1]: h(t) in input time
    h_last: tuple  # L*D entries [B, N1] ((h, c) pairs for the LSTM): forward net at the last valid step, reverse at t=0
    z2s: Array  # [T, B, M] output pre-activations Z2(t)


@functools.partial(jax.jit, static_argnames=("spec", "unroll", "recurrence"))
def _forward(params, spec, xs, h0, lengths, unroll, recurrence="auto"):
    from bptt_jax.core import activations  # local: keeps the import graph of the design table

    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths)  # shapes: once per signature
    outer = xs.dtype
    params, xs, h0 = precision.to_compute(spec.compute_dtype, (params, xs, h0))
    rec = kernels.resolve(recurrence, spec.hidden_sizes, xs.dtype, cell=spec.cell, differentiable=True)
    traces = run_stack(params, spec, xs, h0, lengths, unroll=resolve_unroll(unroll), recurrence=rec)
    top = traces[-1].merged
    z2s = precision.mm(top, params.readout.w2) + params.readout.b2  # [T, B, M]
    ys = activations.output(spec.output_activation, z2s)
    hidden = cells.get(spec.cell).hidden
    hs, h_last = [], []
    for tr in traces:
        for j, (h, final) in enumerate(zip(tr.states, _finals(tr))):
            hs.append(hidden(h if j == 0 else reverse_padded(h, lengths)))
            h_last.append(final.astype(outer))  # the dtype a caller feeds back as h0
    return ForwardOutput(ys, tuple(hs), spec.public_states(tuple(h_last)), z2s)


def forward(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    *,
    h0: tuple[Array, ...] | None = None,
    lengths: Array | None = None,
    unroll: int | None = None,
    recurrence: str = "auto",
    check_values: bool | None = None,
    check_finite: bool = False,
) -> ForwardOutput:
    """Runs the network over a batch of sequences.

    Args:
      params: the network's parameters, shaped as ``expected_shapes(spec)``.
      spec: the network (static).
      xs: [T, B, N] inputs, time-major, float.
      h0: L*D entries [B, N1], h(-1) per layer and direction (order layer * D + direction); for
        the LSTM each entry is an (h(-1), c(-1)) pair. Zeros when None.
      lengths: [B] integer valid steps per sequence, in [0, T]; steps t >= lengths[b] hold the
        state. None means every step is valid.
      unroll: scan steps per loop iteration; None picks 1 on a CPU and ``GPU_UNROLL`` on a GPU.
      recurrence: "scan" (``lax.scan``), "pallas" (the fused kernels of ``bptt_jax.core.kernels``; interpret
        mode on a CPU) or "auto" (the kernels on a GPU where they apply, else the scans).
      check_values: range checks of lengths (see ``bptt_jax.core.checks``): None reads host arrays only.
      check_finite: raise ValueError if xs, h0 or params hold NaN or inf (needs concrete values).

    Returns:
      ``ForwardOutput(ys [T, B, M], hs, h_last, z2s [T, B, M])``.
    """
    lengths, _ = checks.host_checks(spec, xs, None, None, lengths, check_values)
    if check_finite:
        checks.check_finite_inputs(xs, h0, params)
    return _forward(params, spec, xs, h0, lengths, unroll, recurrence)
