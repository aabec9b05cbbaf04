"""The Elman cell of the lecture notes: Z1(t) = X(t) W1 + h(t-1) W11 + b1, h(t) = f1(Z1(t)).

In the cells' common form the input side is A(t) = X(t) W1 + b1 and the recurrent side
V(t) = h(t-1) W11, so h(t) = f1(A(t) + V(t)) and dA(t) = dV(t) = dZ1(t). The state is h(t); only
h(t) is stored across the sequence: f1' is computed from h(t) (tanh, relu, sigmoid), so Z1 never is.

Backward of one step (the notes' recursion)::

    dh(t)   = dh_above(t) + dZ1(t+1) W11^T      # from the output side and from the next step
    dZ1(t)  = dh(t) * f1'(h(t))
    dW1 += X(t)^T dZ1(t);  dW11 += h(t-1)^T dZ1(t);  db1 += dZ1(t)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import activations
from bptt_jax.core.cells.base import flat
from bptt_jax.core.precision import is_half, mm, rounded, zeros_acc

Array = jax.Array

GATES = 1
CACHE = 0  # nothing to cache: f1'(Z1(t)) is computed from h(t) itself
STORE_FROM = 0  # (nothing is stored)


class LayerParams(NamedTuple):
    """One recurrent layer (one direction): Z1(t) = X(t) W1 + h(t-1) W11 + b1."""

    w1: Array  # [N_in, N1]  W^(1)
    w11: Array  # [N1, N1]   W^(11)
    b1: Array  # [N1]        b^(1)


Params = LayerParams


def state_width(n1: int) -> int:
    return n1


def hidden(s: Array) -> Array:
    return s


def shapes(n_in: int, n1: int):
    return LayerParams((n_in, n1), (n1, n1), (n1,))  # type: ignore[arg-type]


def init(keys: Any, shp: Any, *, scheme: str, scale: float, dtype, forget_bias: float = 0.0):
    """Initial parameters (``params.init_params`` documents the schemes); keys and shp are
    LayerParams of PRNG keys and of shapes."""
    n1 = shp.w11[0]
    bound = 1.0 / math.sqrt(n1)
    u = lambda kk, s: jax.random.uniform(kk, s, dtype, -bound, bound)
    if scheme == "uniform":
        return LayerParams(u(keys.w1, shp.w1), u(keys.w11, shp.w11), u(keys.b1, shp.b1))
    if scheme == "orthogonal":
        w11 = scale * jax.nn.initializers.orthogonal()(keys.w11, shp.w11, dtype)
        return LayerParams(u(keys.w1, shp.w1), w11, u(keys.b1, shp.b1))
    if scheme == "identity":
        w1 = 0.001 * jax.random.normal(keys.w1, shp.w1, dtype)
        return LayerParams(w1, scale * jnp.eye(n1, dtype=dtype), jnp.zeros(shp.b1, dtype))
    return LayerParams(
        scale * jax.random.normal(keys.w1, shp.w1, dtype),
        scale * jax.random.normal(keys.w11, shp.w11, dtype),
        jnp.zeros(shp.b1, dtype),
    )


def project(p: LayerParams, xs: Array) -> Array:
    """A = X W1 + b1: [..., N_in] -> [..., N1], one matmul for every step given."""
    return mm(xs, p.w1) + p.b1


def step(p: LayerParams, activation: str, h_tm1: Array, x_t: Array) -> Array:
    """One time step, as the lecture notes write it.

    Args:
      p: W1 [N, N1], W11 [N1, N1], b1 [N1].
      activation: f1's name.
      h_tm1: [B, N1] h(t-1).
      x_t: [B, N] X(t).

    Returns:
      [B, N1] h(t) = f1(Z1(t)), Z1(t) = X(t) W1 + h(t-1) W11 + b1.
    """
    return recur(p, activation, h_tm1, project(p, x_t))


def recur(p: LayerParams, activation: str, h_tm1: Array, u_t: Array) -> Array:
    """The recurrent half of ``step``, for scans that form u(t) = X(t) W1 + b1 for all t before the
    loop: h(t) = f1(u(t) + h(t-1) W11). [B, N1], in h(t-1)'s dtype (``bptt_jax.core.precision``)."""
    return activations.hidden(activation).f(u_t + mm(h_tm1, p.w11)).astype(h_tm1.dtype)


def recur_cache(p: LayerParams, activation: str, h_tm1: Array, u_t: Array) -> tuple[Array, Array]:
    """(h(t), an empty cache [B, 0]): the Elman cell keeps nothing (f1' is computed from h(t))."""
    h_t = recur(p, activation, h_tm1, u_t)
    return h_t, jnp.zeros(h_t.shape[:-1] + (0,), h_t.dtype)


def recurrent_input(p: LayerParams, hs_tm1: Array) -> Array:
    """V = h(t-1) W11 for many steps at once (b1 is in A): ``reverse``'s dV is its gradient."""
    return mm(hs_tm1, p.w11)


def reverse_recurrence(
    w11: Array,
    activation: str,
    hs: Array,
    dhs_above: Array,
    valid: Array | None,
    dh_init: Array | None,
    *,
    with_norms: bool = True,
    unroll: int = 1,
) -> tuple[Array, Array, Array | None]:
    """The reverse recurrence of one layer over a run of steps (scan time).

    Equals the Python loop::

        carry = dh_init (or 0)                    # dZ1(T) W11^T
        for t in reversed(range(T)):
            dh = dhs_above[t] + carry             # dh(t)
            dz1[t] = dh * f1'(hs[t])              # 0 where not valid[t]
            carry = dz1[t] @ w11.T                # dh where not valid[t]: padding passes dh through
                                                  # (dz1[t] in w11's dtype for this product)
        dh_m1 = carry                             # dDIV/dh(-1)

    Returns:
      (dz1s [T, B, N1], dh_m1 [B, N1], dh_norm [T, B] the norm of dh(t) per sequence, or None).
    """
    df = activations.hidden(activation).df_from_h
    w11_t = w11.T  # one transposed copy: contracting W11's second axis in the loop ran 1.0-1.16x slower

    def back(dz1_t):
        """dZ1(t) W11^T with dZ1(t) in W11's dtype, as every matmul operand: a 16-bit W11 is then not
        widened into a float32 copy (the product is accumulated in float32 all the same)."""
        return mm(rounded(dz1_t, w11.dtype), w11_t)

    def body(carry, inp):
        dh_above_t, h_t, valid_t = inp
        dh_t = dh_above_t + carry  # [B, N1]
        dz1_t = dh_t * df(h_t.astype(dh_t.dtype))
        if valid_t is None:
            carry = back(dz1_t)
        else:
            dz1_t = jnp.where(valid_t[:, None], dz1_t, 0.0)
            carry = jnp.where(valid_t[:, None], back(dz1_t), dh_t)
        norm = jnp.sqrt(jnp.sum(dh_t * dh_t, axis=-1)) if with_norms else None
        return carry, (dz1_t, norm)

    init = zeros_acc(hs[0]) if dh_init is None else dh_init
    dh_m1, (dz1s, dh_norm) = lax.scan(body, init, (dhs_above, hs, valid), reverse=True, unroll=unroll)
    return dz1s, dh_m1, dh_norm


def reverse(
    p: LayerParams, activation, xs, s_tm1s, ss, dhs_above, valid, ds_init, *, with_norms=True, unroll=1, cache=None
):
    """(dA = dZ1, dV = dZ1, dh(-1), norms): the Elman cell needs neither X nor h(t-1) for it (and no
    cache: ``cache`` is ignored) -- except in a 16-bit compute dtype, where f1' is taken from h(t)
    recomputed in float32 from X(t) and h(t-1) (two block matmuls, as the gated cells' gates):
    1 - h^2 from a 16-bit h(t) loses every digit where tanh saturates (h = tanh(-3.5) rounds to -1
    in bfloat16, and f1' to 0), while the forward pass computed h(t) in float32 before rounding it."""
    if is_half(ss.dtype):
        ss = activations.hidden(activation).f(project(p, xs) + mm(s_tm1s, p.w11))
    dz1s, dh_m1, norms = reverse_recurrence(
        p.w11, activation, ss, dhs_above, valid, ds_init, with_norms=with_norms, unroll=unroll
    )
    return dz1s, dz1s, dh_m1, norms


def weight_grads(p: LayerParams, xs: Array, hs_tm1: Array, das: Array, dvs: Array) -> LayerParams:
    """dW1 = sum_t X(t)^T dZ1(t), dW11 = sum_t h(t-1)^T dZ1(t), db1 = sum_t dZ1(t), one matmul each.

    xs: [C, B, N_in]; hs_tm1: [C, B, N1] h(t-1); das = dvs: [C, B, N1] dZ1(t).
    """
    dz = flat(das)
    return LayerParams(mm(flat(xs).T, dz), mm(flat(hs_tm1).T, dz), jnp.sum(dz, axis=0))


def input_grad(p: LayerParams, das: Array) -> Array:
    """dZ1(t) W1^T [C, B, N_in]: the gradient handed to the layer below (or dX(t))."""
    return mm(das, p.w1.T)
