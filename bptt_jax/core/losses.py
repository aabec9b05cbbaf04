"""Divergences Div(Y(t), D(t)), their reduction DIV = mean_b sum_t w(t) Div, and dDIV/dZ2.

Two paths give dDIV/dZ2(t):
- generic (the lecture notes literally): dDIV/dY(t) times the output activation's Jacobian, full
  M x M for softmax and diagonal for scalar activations;
- fused: the closed forms softmax + cross-entropy -> Y - D, sigmoid + binary cross-entropy ->
  Y - D, and for squared error the Jacobian product without building the M x M matrix.
Tests show the two agree; the fused path is the default (it never divides by Y).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_jax.core import activations

Array = jax.Array


def effective_weights(weights: Array | None, lengths: Array | None, t_len: int, batch: int, dtype) -> Array:
    """w(t) per (t, b): the given weights (ones by default), zero wherever t >= lengths[b]. [T, B]."""
    w = jnp.ones((t_len, batch), dtype) if weights is None else weights.astype(dtype)
    if lengths is not None:
        w = jnp.where(jnp.arange(t_len)[:, None] < lengths[None, :], w, 0.0)
    return w


def _dense_targets(targets: Array, m: int, dtype) -> Array:
    """Class indices [T, B] -> one-hot [T, B, M]; probabilities pass through."""
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return jax.nn.one_hot(targets, m, dtype=dtype)
    return targets.astype(dtype)


def divergence(divergence_name: str, z2s: Array, ys: Array, targets: Array) -> Array:
    """Div(Y(t), D(t)) for every t and b.

    Args:
      divergence_name: cross_entropy | squared_error | binary_cross_entropy.
      z2s: [T, B, M] output pre-activations (cross-entropies are computed from them, stably).
      ys: [T, B, M] outputs Y = f2(Z2).
      targets: [T, B] class indices or [T, B, M] targets D.

    Returns:
      [T, B] divergences.
    """
    m = z2s.shape[-1]
    if divergence_name == "cross_entropy":
        logp = jax.nn.log_softmax(z2s, axis=-1)  # never log(0)
        if jnp.issubdtype(targets.dtype, jnp.integer):
            return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(targets * logp, axis=-1)
    d = _dense_targets(targets, m, ys.dtype)
    if divergence_name == "squared_error":
        return jnp.sum((ys - d) ** 2, axis=-1)
    if divergence_name == "binary_cross_entropy":
        # -(d log sigmoid(z) + (1 - d) log(1 - sigmoid(z))) = softplus(z) - d z
        return jnp.sum(jax.nn.softplus(z2s) - d * z2s, axis=-1)
    raise ValueError(f"divergence: unknown name {divergence_name!r}")


def total(divs: Array, w: Array) -> Array:
    """DIV = mean over the batch of sum over t of w(t) Div(t). divs, w: [T, B]. Returns a scalar."""
    return jnp.sum(w * divs) / divs.shape[1]


def output_grad(
    divergence_name: str,
    output_activation: str,
    z2s: Array,
    ys: Array,
    targets: Array,
    w: Array,
    *,
    generic: bool = False,
) -> Array:
    """dDIV/dZ2(t) for all t at once, for DIV = total(divergence(...), w).

    Args:
      z2s, ys: [T, B, M] Z2 and Y = f2(Z2).
      targets: [T, B] or [T, B, M].
      w: [T, B] effective weights.
      generic: use the lecture notes' generic path dDIV/dY . J_f2 (full Jacobian for softmax).

    Returns:
      [T, B, M] dDIV/dZ2.
    """
    m = z2s.shape[-1]
    scale = (w / z2s.shape[1])[..., None]  # [T, B, 1] the w(t)/B of the reduction
    d = _dense_targets(targets, m, ys.dtype)
    if divergence_name == "cross_entropy":
        if not generic:
            return scale * (ys * jnp.sum(d, axis=-1, keepdims=True) - d)
        dy = scale * (-d / ys)  # dDIV/dY
        return activations.output_vjp(output_activation, ys, dy, materialize=True)
    if divergence_name == "binary_cross_entropy":
        if not generic:
            return scale * (ys - d)
        dy = scale * ((1.0 - d) / (1.0 - ys) - d / ys)
        return activations.output_vjp(output_activation, ys, dy, materialize=True)
    if divergence_name == "squared_error":
        dy = scale * 2.0 * (ys - d)
        return activations.output_vjp(output_activation, ys, dy, materialize=generic)
    raise ValueError(f"divergence: unknown name {divergence_name!r}")
