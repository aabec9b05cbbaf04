"""One recurrent layer whose weight gradients are plain matmuls outside its custom VJP: the form of
the explicit BPTT that ``jax.vmap`` batches well.

    hs, s_last = layer_states(layer, activation, xs, h0, valid, unroll=1)   # xs [T, B, N]

Under ``jax.vmap`` JAX runs a custom VJP's backward rule for each sequence: ``rnn_states``' weight
gradients (dWh = sum_t h(t-1)^T dV(t), dWx = sum_t X(t)^T dA(t), ...) then come out once per sequence,
[N1, G N1] each, and are summed afterwards -- the Equinox layer vmapped over a batch ran at 0.6-0.7x
the speed of the same layer called once on the batch (benchmarks/results/eqx_speed.md). Here the
custom VJP covers the reverse recurrence alone. It takes the two projections the notes' step adds,

    A(t) = X(t) Wx + bx           V(t) = h(t-1) Wh + bh          (Elman: Z1(t) = A(t) + V(t))

and returns dDIV/dA(t) and dDIV/dV(t) (the reverse recursion of ``cell.reverse``, one scan over the
sequence, the gates read from the forward scan's cache). The matmuls that turn those into dWx,
dbx, dX, dWh and dbh are ordinary ``jax.numpy`` outside the custom VJP, which ``jax.grad``
transposes and ``jax.vmap`` batches into whole-batch matmuls, as for any dense layer. V's value is
never read (the forward scan computes h(t) step by step from h(t-1)), so XLA drops its forward
matmul; only its transpose against the saved h(t-1) runs, in the backward pass.

With ``native=True`` the two loops are the compiled kernel's (``core.native``: the forward call
forms A(t) itself and keeps the gates, the reverse call returns dA and dV without sums), and under
``jax.vmap`` each runs ONCE for the whole vmapped batch: ``jax.custom_batching.custom_vmap`` rules
fold the vmapped axis into the kernel's batch rows (see ``_kernel_forward``), where an FFI call
alone would run once per sequence. Per-example semantics hold in every order of the
transformations (``jax.vmap`` of ``jax.grad`` gives each sequence's own weight gradients: they are
still jax.grad's matmuls, outside the rules; ``jax.vmap``'s form of them contracts the vmapped
and the time axes, which XLA:CPU feeds through transposed copies of dA and dV). Where
``jax.vmap`` is the innermost transformation (``jax.grad`` of a vmapped loss, as in training:
``_vmap_innermost``) the Equinox layer does not come here: it runs its batch call on the whole
vmapped batch instead.

The same gradients as ``rnn_states`` (tests/test_layers_equinox.py, tests/test_native.py); one
layer, one direction, the parameters' dtype (no compute dtype), the gated cells' gates stored
(``gates="store"``'s memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_batching, lax

from bptt_jax.core import cells, native
from bptt_jax.core.precision import accumulation

Array = jax.Array


def layer_states(
    layer, activation: str, xs: Array, h0: Array, valid: Array | None, *, unroll: int = 1, native: bool = False
):
    """(h(t) [T, B, N1], the final state [B, W] (internal layout: [h | c] for the LSTM)) of one layer
    over xs [T, B, N] from h0 [B, W]; padded steps (``valid`` [T, B] False) hold the state.
    Differentiable (once) in ``layer``, ``xs`` and ``h0`` by the explicit BPTT. ``native``: the
    two loops run the compiled kernel (``core.native``; float32 on the CPU), which ``jax.vmap``
    runs once for the whole vmapped batch (see the module's docstring)."""
    cell = cells.of(layer)
    kernel = cells.name_of(layer) if native else None
    a = cell.project(layer, xs)  # A(t) [T, B, G N1]: differentiated by jax.grad
    frozen = lax.stop_gradient(layer)
    if kernel is None:
        ss, caches = _forward(cell, frozen, activation, lax.stop_gradient(a), lax.stop_gradient(h0), valid, unroll)
    else:  # the kernel forms A(t) itself from X: the value of ``a`` is never read (XLA drops it)
        ss, caches = _kernel_forward(kernel, activation)(frozen, lax.stop_gradient(xs), lax.stop_gradient(h0), valid)
    s_tm1 = jnp.concatenate([lax.stop_gradient(h0)[None], ss[:-1]], axis=0)
    v = cell.recurrent_input(layer, cell.hidden(s_tm1))  # V(t): only its gradient is used
    return _recurrence(activation, unroll, kernel, frozen, a, v, h0, ss, caches, valid)


def _forward(cell, layer, activation: str, a: Array, h0: Array, valid: Array | None, unroll: int):
    """(states s(t) [T, B, W], the gate caches [T, B, CACHE N1] or None for the Elman cell)."""
    gated = cell.CACHE > 0

    def body(s_tm1, inp):
        a_t, valid_t = inp
        s_t, cache_t = (
            cell.recur_cache(layer, activation, s_tm1, a_t)
            if gated
            else (cell.recur(layer, activation, s_tm1, a_t), None)
        )
        if valid_t is not None:
            s_t = jnp.where(valid_t[:, None], s_t, s_tm1)  # a padded step's cache is never read
        return s_t, (s_t, cache_t)

    _, (ss, caches) = lax.scan(body, h0, (a, valid), unroll=unroll)
    return ss, caches


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(activation, unroll, kernel, layer, a, v, h0, ss, caches, valid):
    """(h(t), s(T-1)) from the forward loop's states ``ss``; its VJP gives dA, dV and ds(-1)
    (``kernel``: the cell's name where the kernel ran the forward loop, else None)."""
    del a, v, h0, caches, valid
    return cells.of(layer).hidden(ss), ss[-1]


def _recurrence_fwd(activation, unroll, kernel, layer, a, v, h0, ss, caches, valid):
    return _recurrence(activation, unroll, kernel, layer, a, v, h0, ss, caches, valid), (layer, h0, ss, caches, valid)


def _recurrence_bwd(activation, unroll, kernel, residuals, cts):
    """The notes' reverse recursion from dDIV/dh(t) (every t) and dDIV/ds(T-1): dA, dV, ds(-1)."""
    layer, h0, ss, caches, valid = residuals
    d_hs, d_last = cts
    if kernel is not None:
        das, dvs, ds_m1 = _kernel_reverse(kernel, activation)(layer, h0, caches, valid, d_hs, d_last)
        return None, das, dvs, ds_m1, None, None, None
    cell = cells.of(layer)
    s_tm1 = jnp.concatenate([h0[None], ss[:-1]], axis=0)
    d_last = d_last.astype(accumulation(d_last.dtype))
    das, dvs, ds_m1, _ = cell.reverse(
        layer, activation, None, s_tm1, ss, d_hs, valid, d_last, with_norms=False, unroll=unroll, cache=caches
    )
    return None, das, dvs, ds_m1.astype(h0.dtype), None, None, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# The kernel's loops under jax.vmap. A vmapped one-sequence call would run an FFI call once per
# sequence (``vmap_method="sequential"``, B = 1 rows per step); ``jax.custom_batching.custom_vmap``
# gives the two loops batching rules that fold the vmapped axis into the kernel's batch instead: one
# call over all Bv B rows, as the layer called on the whole batch. The rules see the arrays
# batch-major ([Bv, T, B, ...], vmap's axis in front) and the kernel wants them time-major
# ([T, Bv B, ...]): the inputs and the outputs that the rest of the program reads (the states, dA,
# dV) are transposed, honestly batched. The forward loop's residuals for the reverse one (the
# time-major states and the gate cache, ``hidden`` below) are read by the reverse rule alone: a
# batched residual keeps the kernel's time-major bytes under vmap's batch-major shape (a reshape,
# no copy), and every rule (the fallbacks included) writes and reads them that way. The rules run
# one kernel call where the weights are not vmapped; where they are (an ensemble of layers), each
# vmapped element's call runs on its own (``jax.vmap`` of the one-sequence call).


@functools.cache
def _kernel_forward(kernel: str, activation: str):
    """f(layer, X [T, B, N], h0 [B, W], valid) -> (states [T, B, W], hidden): the kernel's forward
    loop (gates stored) and the reverse loop's residuals (time-major states, gate cache)."""

    def one(layer, xs, h0, valid):
        if kernel == "elman":
            hs = native.elman_forward_x(layer, activation, xs, h0, valid)
            return hs, (hs, None)
        ss, cache = native.forward(kernel, layer, xs, h0, valid, store=True)
        return ss, (ss, cache)

    f = custom_batching.custom_vmap(one)

    @f.def_vmap
    def rule(size, in_batched, layer, xs, h0, valid):
        if any(jax.tree_util.tree_leaves(in_batched[0])):  # vmapped weights: each element its own call
            ss, hidden = jax.vmap(one, in_axes=_axes(in_batched))(layer, xs, h0, valid)
            hidden = jax.tree_util.tree_map(lambda r: _hide(_fold(r, True, size), size), hidden)
            return (ss, hidden), (True, _batched(hidden))
        _, xs_b, h0_b, valid_b = in_batched
        ss, hidden = one(layer, _fold(xs, xs_b, size), _fold_rows(h0, h0_b, size), _fold_mask(valid, valid_b, size))
        hidden = jax.tree_util.tree_map(lambda r: _hide(r, size), hidden)
        return (_unfold(ss, size), hidden), (True, _batched(hidden))

    return f


@functools.cache
def _kernel_reverse(kernel: str, activation: str):
    """f(layer, h0, hidden, valid, dDIV/dh(t) [T, B, N1], dDIV/ds(T-1) [B, W]) -> (dA, dV, ds(-1)):
    the kernel's reverse loop, no sums (the weight gradients are jax.grad's matmuls around it)."""

    def one(layer, h0, hidden, valid, d_hs, d_last):
        return loop(layer, h0, hidden, valid, d_hs, d_last, False)

    def loop(layer, h0, hidden, valid, d_hs, d_last, batch_major: bool):
        ss, cache = hidden
        if kernel == "elman":
            dzs, dh_m1, _ = native.elman_reverse(
                layer.w11, activation, ss, d_hs, valid, d_last, batch_major=batch_major
            )
            return dzs, dzs, dh_m1
        bh = layer.bh if kernel == "gru" else None
        return native.reverse_d(kernel, layer.wh, d_hs, cache, h0, ss, valid, d_last, batch_major=batch_major, bh=bh)

    f = custom_batching.custom_vmap(one)

    @f.def_vmap
    def rule(size, in_batched, layer, h0, hidden, valid, d_hs, d_last):
        layer_b, h0_b, hidden_b, valid_b, d_hs_b, d_last_b = in_batched
        # the residuals in time-major order [T, Bv B, ...] (broadcast where not vmapped)
        hidden = jax.tree_util.tree_map(lambda r, b: _unhide(r) if b else _fold(r, False, size), hidden, hidden_b)
        if any(jax.tree_util.tree_leaves(layer_b)):  # vmapped weights: each element its own call
            hidden = jax.tree_util.tree_map(lambda r: _unfold(r, size), hidden)
            axes = (0, 0 if h0_b else None, 0, 0 if valid_b else None, 0 if d_hs_b else None, 0 if d_last_b else None)
            axes = (jax.tree_util.tree_map(lambda b: 0 if b else None, layer_b),) + axes[1:]
            return jax.vmap(one, in_axes=axes)(layer, h0, hidden, valid, d_hs, d_last), (True, True, True)
        d_hs = _fold(d_hs, d_hs_b, size)
        # one sequence per vmapped element (the Equinox layer's call): the kernel writes dA and dV
        # batch-major, as vmap's batched arrays are laid out (no transposed copies for the matmuls)
        one_row = d_hs.shape[1] == size
        das, dvs, ds_m1 = loop(
            layer,
            _fold_rows(h0, h0_b, size),
            hidden,
            _fold_mask(valid, valid_b, size),
            d_hs,
            _fold_rows(d_last, d_last_b, size),
            batch_major=one_row,
        )
        back = (lambda d: d[:, :, None]) if one_row else (lambda d: _unfold(d, size))  # [Bv, T, B, G N1]
        da = back(das)
        dv = da if dvs is das else back(dvs)
        return (da, dv, ds_m1.reshape(size, -1, ds_m1.shape[-1])), (True, True, True)

    return f


def _axes(in_batched):
    return jax.tree_util.tree_map(lambda b: 0 if b else None, in_batched)


def _batched(tree):
    return jax.tree_util.tree_map(lambda _: True, tree)


def _fold(v: Array, batched: bool, size: int) -> Array:
    """A time-major array of one vmapped element [T, B, ...] (batched: [Bv, T, B, ...]) -> [T, Bv B, ...]."""
    if not batched:
        v = jnp.broadcast_to(v, (size, *v.shape))
    v = jnp.moveaxis(v, 0, 1)
    return v.reshape(v.shape[0], -1, *v.shape[3:])


def _fold_rows(v: Array, batched: bool, size: int) -> Array:
    """[B, W] per element (batched: [Bv, B, W]) -> [Bv B, W]."""
    return (v if batched else jnp.broadcast_to(v, (size, *v.shape))).reshape(-1, v.shape[-1])


def _fold_mask(valid: Array | None, batched, size: int) -> Array | None:
    return None if valid is None else _fold(valid, bool(batched), size)


def _unfold(v: Array, size: int) -> Array:
    """[T, Bv B, ...] -> batch-major [Bv, T, B, ...] (a transposed copy)."""
    return jnp.moveaxis(v.reshape(v.shape[0], size, -1, *v.shape[2:]), 1, 0)


def _hide(v: Array, size: int) -> Array:
    """[T, Bv B, ...] -> shape [Bv, T, B, ...] holding the same time-major bytes (a reshape)."""
    return v.reshape(size, v.shape[0], -1, *v.shape[2:])


def _unhide(v: Array) -> Array:
    """``_hide``'s inverse: [Bv, T, B, ...] of time-major bytes -> [T, Bv B, ...]."""
    return v.reshape(v.shape[1], -1, *v.shape[3:])


def _vmap_innermost(x: Array) -> bool:
    """Whether ``jax.vmap`` is the transformation tracing this call right now and batches ``x``: a
    ``custom_vmap`` function called here is batched by its rule before any ``jax.grad`` outside the
    vmap differentiates the rule's ordinary operations (the Equinox layer's batch call over the
    vmapped batch). Where ``jax.grad`` is inside the vmap (``jax.vmap`` of ``jax.grad``: per-example
    gradients) it is not, and must not be: custom_vmap has no reverse-mode rule. Reads JAX's trace
    state; False where it cannot (another JAX version): the callers' other path, the same values."""
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import batching

        trace = jax_core.trace_ctx.trace
        return isinstance(trace, batching.BatchTrace) and isinstance(x, batching.BatchTracer) and x._trace is trace
    except (ImportError, AttributeError):
        return False
