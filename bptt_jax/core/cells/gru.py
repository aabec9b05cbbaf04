"""The GRU cell (Cho et al. 2014), PyTorch's gate order r | z | n and its two biases.

Forward, row vectors; A(t) is formed for many steps at once (one matmul), V(t) in the loop::

    A(t) = X(t) Wx + bx                   [B, 3 N1]   Wx [N_in, 3 N1]
    V(t) = h(t-1) Wh + bh                 [B, 3 N1]   Wh [N1, 3 N1]
    r = sigmoid(A_r + V_r)      z = sigmoid(A_z + V_z)
    n = tanh(A_n + r * V_n)                           b_hn sits inside r * (...): a parameter of its own
    h(t) = (1 - z) * n + z * h(t-1)

Backward of one step, from dh(t) = dh_above(t) + dh_carry (the same shape as the notes' recursion)::

    dn = dh * (1 - z);   dz = dh * (h(t-1) - n)
    dA_n = dn * (1 - n^2)            dV_n = dA_n * r
    dA_r = dV_r = dA_n * V_n * r (1 - r)
    dA_z = dV_z = dz * z (1 - z)
    dh(t-1) = dh * z + dV(t) Wh^T                     # the direct path and the recurrent matmul
    dWx += X(t)^T dA(t);  dWh += h(t-1)^T dV(t);  dbx += dA(t);  dbh += dV(t)

Stored across the sequence: h(t) only. In a block of C steps the backward pass recomputes A and V
with two block matmuls from the block's X(t) and h(t-1), forms the gate derivatives elementwise for
all C steps, and then runs a reverse loop whose only matmul per step is dV(t) Wh^T.

Or, where ``bptt``'s ``gates`` is "store", the forward scan also keeps the gate cache
[r | z | n | V_n] (4 N1 per step and example, ``recur_cache``) and the backward pass reads it
instead of recomputing: no recompute matmuls, 4 N1 more floats kept per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core.cells import base
from bptt_jax.core.cells.base import flat
from bptt_jax.core.precision import accumulation, mm, zeros_acc

Array = jax.Array

GATES = 3
CACHE = 4  # the gate cache [r | z | n | V_n] per step, in units of N1
# gates="auto" stores the cache only from STORE_FROM cached elements on (all layers and directions):
# below that, recomputing ran faster here (0.79-0.92x for storing at 5 of 6 sizes from 12,800 to
# 51,200 elements; benchmarks/gate_blocks.py), where a step's fixed costs outweigh the two block matmuls.
STORE_FROM = 2**16


class GRUParams(NamedTuple):
    """One GRU layer (one direction), gates r | z | n along the last axis."""

    wx: Array  # [N_in, 3 N1]  input weights (PyTorch's weight_ih, transposed)
    wh: Array  # [N1, 3 N1]    recurrent weights (weight_hh, transposed)
    bx: Array  # [3 N1]        b_ir | b_iz | b_in
    bh: Array  # [3 N1]        b_hr | b_hz | b_hn


Params = GRUParams


def state_width(n1: int) -> int:
    return n1


def hidden(s: Array) -> Array:
    return s


def shapes(n_in: int, n1: int):
    return GRUParams((n_in, 3 * n1), (n1, 3 * n1), (3 * n1,), (3 * n1,))  # type: ignore[arg-type]


def init(keys: Any, shp: Any, *, scheme: str, scale: float, dtype, forget_bias: float = 0.0):
    """Initial parameters: ``base.gated_init`` (PyTorch's default, "orthogonal" or "normal")."""
    return base.gated_init(GRUParams, GATES, keys, shp, scheme=scheme, scale=scale, dtype=dtype)


def project(p: GRUParams, xs: Array) -> Array:
    """A = X Wx + bx: [..., N_in] -> [..., 3 N1]."""
    return mm(xs, p.wx) + p.bx


def _gates(a: Array, v: Array):
    n1 = a.shape[-1] // 3
    r = jax.nn.sigmoid(a[..., :n1] + v[..., :n1])
    z = jax.nn.sigmoid(a[..., n1 : 2 * n1] + v[..., n1 : 2 * n1])
    n = jnp.tanh(a[..., 2 * n1 :] + r * v[..., 2 * n1 :])
    return r, z, n


def recur_cache(p: GRUParams, activation: str, h_tm1: Array, a_t: Array) -> tuple[Array, Array]:
    """(h(t), the gate cache [r | z | n | V_n] [B, 4 N1]) from h(t-1) [B, N1] and A(t) [B, 3 N1]: the
    module docstring's forward step, also returning what ``reverse`` reads with gates="store". Both
    in h(t-1)'s dtype (``bptt_jax.core.precision``)."""
    n1 = h_tm1.shape[-1]
    v = mm(h_tm1, p.wh) + p.bh  # V(t)
    r, z, n = _gates(a_t, v)
    h_t = (1.0 - z) * n + z * h_tm1
    return h_t.astype(h_tm1.dtype), jnp.concatenate([r, z, n, v[..., 2 * n1 :]], axis=-1).astype(h_tm1.dtype)


def recur(p: GRUParams, activation: str, h_tm1: Array, a_t: Array) -> Array:
    """h(t) alone (``recur_cache`` without its cache, which XLA then never computes)."""
    return recur_cache(p, activation, h_tm1, a_t)[0]


def gate_cache(p: GRUParams, xs: Array, hs_tm1: Array) -> Array:
    """The gate cache [r | z | n | V_n] of C steps at once [C, B, 4 N1], from X(t) and h(t-1):
    ``recur_cache``'s, recomputed with two block matmuls (the compiled kernel's reverse reads it)."""
    v = recurrent_input(p, hs_tm1)
    r, z, n = _gates(project(p, xs), v)
    return jnp.concatenate([r, z, n, v[..., 2 * hs_tm1.shape[-1] :]], axis=-1)


def recurrent_input(p: GRUParams, hs_tm1: Array) -> Array:
    """V = h(t-1) Wh + bh for many steps at once: ``reverse``'s dV is its gradient."""
    return mm(hs_tm1, p.wh) + p.bh


def reverse(
    p: GRUParams, activation, xs, hs_tm1, hs, dhs_above, valid, dh_init, *, with_norms=True, unroll=1, cache=None
):
    """The reverse recurrence of C steps (scan time). Equals the Python loop::

        carry = dh_init (or 0)
        for t in reversed(range(C)):
            dh = dhs_above[t] + carry                        # dh(t)
            dA[t], dV[t] = the step backward (module docstring); 0 where not valid[t]
            carry = dh * z(t) + dV[t] @ Wh.T                 # dh where not valid[t]: padding passes dh
        dh_m1 = carry

    Args:
      xs: [C, B, N_in] the layer's input; hs_tm1: [C, B, N1] h(t-1); hs: [C, B, N1] h(t) (unused:
        the gates come from X(t) and h(t-1)); dhs_above: [C, B, N1]; valid: [C, B] or None;
        dh_init: [B, N1] the carry entering from beyond the block, or None.
      cache: [C, B, 4 N1] the forward's gate cache (``recur_cache``), or None: recomputed here.

    Returns:
      (dA [C, B, 3 N1], dV [C, B, 3 N1], dh(-1) [B, N1], ||dh(t)|| [C, B] or None).
    """
    n1 = hs_tm1.shape[-1]
    if cache is None:
        v = mm(hs_tm1, p.wh) + p.bh  # [C, B, 3 N1] V(t): one block matmul (A likewise), then elementwise
        r, z, n = _gates(project(p, xs), v)
        v_n = v[..., 2 * n1 :]
    else:
        cache = cache.astype(accumulation(cache.dtype))
        r, z, n, v_n = (cache[..., k * n1 : (k + 1) * n1] for k in range(4))
    c_n = (1.0 - z) * (1.0 - n * n)  # dA_n = dh * c_n
    c_r = c_n * v_n * r * (1.0 - r)  # dA_r = dh * c_r
    c_z = (hs_tm1 - n) * z * (1.0 - z)  # dA_z = dh * c_z
    wh_t = p.wh.T

    def body(carry, inp):
        above_t, cr_t, cz_t, cn_t, r_t, z_t, valid_t = inp
        dh = above_t + carry  # [B, N1]
        da = jnp.concatenate([dh * cr_t, dh * cz_t, dh * cn_t], axis=-1)  # [B, 3 N1]
        dv = jnp.concatenate([da[:, : 2 * n1], da[:, 2 * n1 :] * r_t], axis=-1)
        new = dh * z_t + mm(dv, wh_t)
        if valid_t is not None:
            da = jnp.where(valid_t[:, None], da, 0.0)
            new = jnp.where(valid_t[:, None], new, dh)
        norm = jnp.sqrt(jnp.sum(dh * dh, axis=-1)) if with_norms else None
        return new, (da, norm)

    init = zeros_acc(hs_tm1[0]) if dh_init is None else dh_init
    dh_m1, (das, norms) = lax.scan(body, init, (dhs_above, c_r, c_z, c_n, r, z, valid), reverse=True, unroll=unroll)
    dvs = jnp.concatenate([das[..., : 2 * n1], das[..., 2 * n1 :] * r], axis=-1)  # padded steps: das = 0
    return das, dvs, dh_m1, norms


def weight_grads(p: GRUParams, xs: Array, hs_tm1: Array, das: Array, dvs: Array) -> GRUParams:
    """dWx = sum_t X(t)^T dA(t), dWh = sum_t h(t-1)^T dV(t), dbx = sum_t dA(t), dbh = sum_t dV(t)."""
    da, dv = flat(das), flat(dvs)
    return GRUParams(mm(flat(xs).T, da), mm(flat(hs_tm1).T, dv), jnp.sum(da, axis=0), jnp.sum(dv, axis=0))


def input_grad(p: GRUParams, das: Array) -> Array:
    """dA(t) Wx^T [C, B, N_in]."""
    return mm(das, p.wx.T)
