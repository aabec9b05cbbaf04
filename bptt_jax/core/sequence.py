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

The same gradients as ``rnn_states`` (tests/test_layers_equinox.py); one layer, one direction, the
parameters' dtype (no compute dtype), the gated cells' gates stored (``gates="store"``'s memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import cells
from bptt_jax.core.precision import accumulation

Array = jax.Array


def layer_states(layer, activation: str, xs: Array, h0: Array, valid: Array | None, *, unroll: int = 1):
    """(h(t) [T, B, N1], the final state [B, W] (internal layout: [h | c] for the LSTM)) of one layer
    over xs [T, B, N] from h0 [B, W]; padded steps (``valid`` [T, B] False) hold the state.
    Differentiable (once) in ``layer``, ``xs`` and ``h0`` by the explicit BPTT."""
    cell = cells.of(layer)
    a = cell.project(layer, xs)  # A(t) [T, B, G N1]: differentiated by jax.grad
    frozen = lax.stop_gradient(layer)
    ss, caches = _forward(cell, frozen, activation, lax.stop_gradient(a), lax.stop_gradient(h0), valid, unroll)
    s_tm1 = jnp.concatenate([lax.stop_gradient(h0)[None], ss[:-1]], axis=0)
    v = cell.recurrent_input(layer, cell.hidden(s_tm1))  # V(t): only its gradient is used
    return _recurrence(activation, unroll, frozen, a, v, h0, ss, caches, valid)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(activation, unroll, layer, a, v, h0, ss, caches, valid):
    """(h(t), s(T-1)) from the forward scan's states ``ss``; its VJP gives dA, dV and ds(-1)."""
    del a, v, h0, caches, valid
    return cells.of(layer).hidden(ss), ss[-1]


def _recurrence_fwd(activation, unroll, layer, a, v, h0, ss, caches, valid):
    return _recurrence(activation, unroll, layer, a, v, h0, ss, caches, valid), (layer, h0, ss, caches, valid)


def _recurrence_bwd(activation, unroll, residuals, cts):
    """The notes' reverse recursion from dDIV/dh(t) (every t) and dDIV/ds(T-1): dA, dV, ds(-1)."""
    layer, h0, ss, caches, valid = residuals
    d_hs, d_last = cts
    cell = cells.of(layer)
    s_tm1 = jnp.concatenate([h0[None], ss[:-1]], axis=0)
    d_last = d_last.astype(accumulation(d_last.dtype))
    das, dvs, ds_m1, _ = cell.reverse(
        layer, activation, None, s_tm1, ss, d_hs, valid, d_last, with_norms=False, unroll=unroll, cache=caches
    )
    return None, das, dvs, ds_m1.astype(h0.dtype), None, None, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
