"""The LSTM cell (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000), PyTorch's
gate order i | f | g | o and its two biases.

Forward, row vectors::

    G(t) = X(t) Wx + bx + h(t-1) Wh + bh          [B, 4 N1]   (A(t) + V(t) in the cells' common form)
    i = sigmoid(G_i)   f = sigmoid(G_f)   g = tanh(G_g)   o = sigmoid(G_o)
    c(t) = f * c(t-1) + i * g                     the cell state: the "constant error carousel"
    h(t) = o * tanh(c(t))

The state is the pair (h, c); inside the package it is one array [B, 2 N1] = [h | c], and the public
calls take and return (h, c) pairs. Backward of one step, from dh(t) = dh_above(t) + dh_carry and
dc(t) (the carry of the cell state)::

    do = dh * tanh(c);   dc_total = dc + dh * o * (1 - tanh(c)^2)
    di = dc_total * g;   df = dc_total * c(t-1);   dg = dc_total * i
    dG = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]  = dA(t) = dV(t)
    dh(t-1) = dG(t) Wh^T;   dc(t-1) = dc_total * f
    dWx += X(t)^T dG(t);  dWh += h(t-1)^T dG(t);  dbx += dG(t);  dbh += dG(t)

Stored across the sequence: h(t) and c(t). In a block the gates are recomputed from X(t) and h(t-1)
with two block matmuls; the reverse loop's only matmul per step is dG(t) Wh^T.

Or, where ``bptt``'s ``gates`` is "store", the forward scan also keeps the gates [i | f | g | o]
(4 N1 per step and example, ``recur_cache``) and the backward pass reads them instead of
recomputing: no recompute matmuls, 4 N1 more floats kept per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core.cells import base
from bptt_jax.core.cells.base import flat
from bptt_jax.core.precision import accumulation, is_half, mm, zeros_acc

Array = jax.Array

GATES = 4
CACHE = 4  # the gate cache [i | f | g | o] per step, in units of N1
STORE_FROM = 0  # storing ran 1.03-1.12x faster at every size measured (benchmarks/gate_blocks.py)


class LSTMParams(NamedTuple):
    """One LSTM layer (one direction), gates i | f | g | o along the last axis."""

    wx: Array  # [N_in, 4 N1]  input weights (PyTorch's weight_ih, transposed)
    wh: Array  # [N1, 4 N1]    recurrent weights (weight_hh, transposed)
    bx: Array  # [4 N1]        b_ii | b_if | b_ig | b_io
    bh: Array  # [4 N1]        b_hi | b_hf | b_hg | b_ho


Params = LSTMParams


def state_width(n1: int) -> int:
    return 2 * n1


def hidden(s: Array) -> Array:
    """h from the internal state [..., 2 N1] = [h | c]."""
    return s[..., : s.shape[-1] // 2]


def shapes(n_in: int, n1: int):
    return LSTMParams((n_in, 4 * n1), (n1, 4 * n1), (4 * n1,), (4 * n1,))  # type: ignore[arg-type]


def init(keys: Any, shp: Any, *, scheme: str, scale: float, dtype, forget_bias: float = 0.0):
    """Initial parameters: ``base.gated_init`` (PyTorch's default, "orthogonal" or "normal"). With a
    ``forget_bias`` b: the forget gate's biases are bx_f = b, bh_f = 0 (their sum is what counts; 1
    is the common recommendation, Jozefowicz et al. 2015; 0 keeps PyTorch's default)."""
    p = base.gated_init(LSTMParams, GATES, keys, shp, scheme=scheme, scale=scale, dtype=dtype)
    if forget_bias:
        n1 = shp.wh[0]
        p = p._replace(bx=p.bx.at[n1 : 2 * n1].set(forget_bias), bh=p.bh.at[n1 : 2 * n1].set(0.0))
    return p


def project(p: LSTMParams, xs: Array) -> Array:
    """A = X Wx + bx: [..., N_in] -> [..., 4 N1]."""
    return mm(xs, p.wx) + p.bx


def _gates(g_all: Array):
    n1 = g_all.shape[-1] // 4
    i = jax.nn.sigmoid(g_all[..., :n1])
    f = jax.nn.sigmoid(g_all[..., n1 : 2 * n1])
    g = jnp.tanh(g_all[..., 2 * n1 : 3 * n1])
    o = jax.nn.sigmoid(g_all[..., 3 * n1 :])
    return i, f, g, o


def recur_cache(p: LSTMParams, activation: str, s_tm1: Array, a_t: Array) -> tuple[Array, Array]:
    """([h(t) | c(t)] [B, 2 N1], the gates [i | f | g | o] [B, 4 N1]) from [h(t-1) | c(t-1)] and A(t)
    [B, 4 N1]: the module docstring's forward step, also returning what ``reverse`` reads with
    gates="store". Both in the state's dtype (``bptt_jax.core.precision``)."""
    n1 = s_tm1.shape[-1] // 2
    h_tm1, c_tm1 = s_tm1[:, :n1], s_tm1[:, n1:]
    i, f, g, o = _gates(a_t + mm(h_tm1, p.wh) + p.bh)
    c = f * c_tm1 + i * g
    s_t = jnp.concatenate([o * jnp.tanh(c), c], axis=-1)
    return s_t.astype(s_tm1.dtype), jnp.concatenate([i, f, g, o], axis=-1).astype(s_tm1.dtype)


def recur(p: LSTMParams, activation: str, s_tm1: Array, a_t: Array) -> Array:
    """[h(t) | c(t)] alone (``recur_cache`` without its cache, which XLA then never computes)."""
    return recur_cache(p, activation, s_tm1, a_t)[0]


def gate_cache(p: LSTMParams, xs: Array, s_tm1s: Array) -> Array:
    """The gates [i | f | g | o] of C steps at once [C, B, 4 N1], from X(t) and [h(t-1) | c(t-1)]:
    ``recur_cache``'s cache, recomputed with two block matmuls (the compiled kernel's reverse reads it)."""
    n1 = s_tm1s.shape[-1] // 2
    return jnp.concatenate(_gates(project(p, xs) + mm(s_tm1s[..., :n1], p.wh) + p.bh), axis=-1)


def recurrent_input(p: LSTMParams, hs_tm1: Array) -> Array:
    """V = h(t-1) Wh + bh for many steps at once: ``reverse``'s dV (= dA) is its gradient."""
    return mm(hs_tm1, p.wh) + p.bh


def reverse(
    p: LSTMParams, activation, xs, s_tm1s, ss, dhs_above, valid, ds_init, *, with_norms=True, unroll=1, cache=None
):
    """The reverse recurrence of C steps (scan time). Equals the Python loop::

        dh_carry, dc = ds_init (or 0)
        for t in reversed(range(C)):
            dh = dhs_above[t] + dh_carry                       # dh(t)
            dG[t] = the step backward (module docstring); 0 where not valid[t]
            dh_carry, dc = dG[t] @ Wh.T, dc_total * f(t)       # (dh, dc) where not valid[t]
        ds_m1 = [dh_carry | dc]                                # (dDIV/dh(-1), dDIV/dc(-1))

    Args:
      xs: [C, B, N_in]; s_tm1s: [C, B, 2 N1] [h(t-1) | c(t-1)]; ss: [C, B, 2 N1] [h(t) | c(t)];
      dhs_above: [C, B, N1] the gradient reaching h(t) from outside; valid: [C, B] or None;
      ds_init: [B, 2 N1] the carry entering from beyond the block, or None.
      cache: [C, B, 4 N1] the forward's gates (``recur_cache``), or None: recomputed here.

    Returns:
      (dG [C, B, 4 N1] (= dA = dV), the same array, ds(-1) [B, 2 N1], norms [C, B, 2] or None:
      ||dDIV/dh(t)|| and ||dDIV/dc(t)|| (the total gradient reaching c(t), the carousel's)).
    """
    n1 = ss.shape[-1] // 2
    acc = accumulation(ss.dtype)  # the stored states and gates in the dtype the backward computes in
    h_tm1 = s_tm1s[..., :n1]
    c_tm1, c = s_tm1s[..., n1:].astype(acc), ss[..., n1:].astype(acc)
    if cache is None:
        i, f, g, o = _gates(project(p, xs) + mm(h_tm1, p.wh) + p.bh)  # two block matmuls, then elementwise
    else:
        cache = cache.astype(acc)
        i, f, g, o = (cache[..., k * n1 : (k + 1) * n1] for k in range(4))
    if is_half(ss.dtype):  # c(t) as the forward computed it, before rounding it to the stored dtype
        c = f * c_tm1 + i * g
    tc = jnp.tanh(c)
    c_o = tc * o * (1.0 - o)  # dG_o = dh * c_o
    c_k = o * (1.0 - tc * tc)  # dc_total = dc + dh * c_k
    c_i = g * i * (1.0 - i)  # dG_i = dc_total * c_i
    c_f = c_tm1 * f * (1.0 - f)  # dG_f = dc_total * c_f
    c_g = i * (1.0 - g * g)  # dG_g = dc_total * c_g
    wh_t = p.wh.T

    def body(carry, inp):
        above_t, co, ck, ci, cf, cg, f_t, valid_t = inp
        dh = above_t + carry[:, :n1]  # [B, N1] dh(t)
        dc = carry[:, n1:]
        dct = dc + dh * ck
        dg_all = jnp.concatenate([dct * ci, dct * cf, dct * cg, dh * co], axis=-1)  # [B, 4 N1]
        new = jnp.concatenate([mm(dg_all, wh_t), dct * f_t], axis=-1)
        if valid_t is not None:
            dg_all = jnp.where(valid_t[:, None], dg_all, 0.0)
            new = jnp.where(valid_t[:, None], new, jnp.concatenate([dh, dc], axis=-1))
        norm = None
        if with_norms:  # (||dDIV/dh(t)||, ||dDIV/dc(t)||): c(t)'s total gradient, through h(t) too
            dc_t = dct if valid_t is None else jnp.where(valid_t[:, None], dct, dc)  # held state: the carry
            norm = jnp.stack([jnp.sqrt(jnp.sum(dh * dh, axis=-1)), jnp.sqrt(jnp.sum(dc_t * dc_t, axis=-1))], -1)
        return new, (dg_all, norm)

    init = zeros_acc(s_tm1s[0]) if ds_init is None else ds_init
    inputs = (dhs_above, c_o, c_k, c_i, c_f, c_g, f, valid)
    ds_m1, (dgs, norms) = lax.scan(body, init, inputs, reverse=True, unroll=unroll)
    return dgs, dgs, ds_m1, norms


def weight_grads(p: LSTMParams, xs: Array, s_tm1s: Array, das: Array, dvs: Array) -> LSTMParams:
    """dWx = sum_t X(t)^T dG(t), dWh = sum_t h(t-1)^T dG(t), dbx = dbh = sum_t dG(t)."""
    n1 = s_tm1s.shape[-1] // 2
    dg = flat(das)
    db = jnp.sum(dg, axis=0)
    return LSTMParams(mm(flat(xs).T, dg), mm(flat(s_tm1s[..., :n1]).T, dg), db, db)


def input_grad(p: LSTMParams, das: Array) -> Array:
    """dG(t) Wx^T [C, B, N_in]."""
    return mm(das, p.wx.T)
