"""Hidden activations f1 with f1' from the output, and output activations f2 with their Jacobians.

Hidden activations (``f1``): each is a pair ``(f, df_from_h)`` where ``df_from_h(h)`` returns
f1'(Z1) computed from h = f1(Z1) alone, so the backward pass never needs the pre-activation Z1:

    tanh:     f1'(Z1) = 1 - h^2
    sigmoid:  f1'(Z1) = h (1 - h)
    relu:     f1'(Z1) = 1[h > 0]
    identity: f1'(Z1) = 1

Output activations (``f2``): softmax is a *vector* activation, Y_k depends on every Z2_j, so its
Jacobian dY/dZ2 is a full M x M matrix, diag(Y) - Y^T Y. tanh, sigmoid and identity are *scalar*
activations: Y_k depends on Z2_k only and the Jacobian is diagonal, stored as its diagonal [..., M].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Activation(NamedTuple):
    """A hidden activation: ``f(z)`` and its derivative written in terms of the output ``h``."""

    f: Callable[[Array], Array]
    df_from_h: Callable[[Array], Array]


def _relu_df(h: Array) -> Array:
    return (h > 0).astype(h.dtype)


HIDDEN_ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(jnp.tanh, lambda h: 1.0 - h * h),
    "relu": Activation(jax.nn.relu, _relu_df),
    "sigmoid": Activation(jax.nn.sigmoid, lambda h: h * (1.0 - h)),
    "identity": Activation(lambda z: z, jnp.ones_like),
}

VECTOR_OUTPUT_ACTIVATIONS = ("softmax",)
SCALAR_OUTPUT_ACTIVATIONS = ("tanh", "sigmoid", "identity")
OUTPUT_ACTIVATIONS = VECTOR_OUTPUT_ACTIVATIONS + SCALAR_OUTPUT_ACTIVATIONS


def hidden(name: str) -> Activation:
    """Returns the hidden activation called ``name`` (one of ``HIDDEN_ACTIVATIONS``)."""
    try:
        return HIDDEN_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation: unknown name {name!r}; allowed: {sorted(HIDDEN_ACTIVATIONS)}") from None


def output(name: str, z2: Array) -> Array:
    """Y = f2(Z2) over the last axis. z2: [..., M] output pre-activations. Returns [..., M]."""
    if name == "softmax":
        return jax.nn.softmax(z2, axis=-1)
    if name == "tanh":
        return jnp.tanh(z2)
    if name == "sigmoid":
        return jax.nn.sigmoid(z2)
    if name == "identity":
        return z2
    raise ValueError(f"output_activation: unknown name {name!r}; allowed: {list(OUTPUT_ACTIVATIONS)}")


def is_vector(name: str) -> bool:
    """True for vector output activations (full Jacobian), False for scalar ones (diagonal)."""
    return name in VECTOR_OUTPUT_ACTIVATIONS


def output_jacobian(name: str, y: Array) -> Array:
    """dY/dZ2 written in terms of Y.

    Args:
      name: the output activation.
      y: [..., M] outputs Y = f2(Z2).

    Returns:
      For a vector activation (softmax) the full Jacobian [..., M, M] with entry [i, j] = dY_i/dZ2_j,
      i.e. diag(Y) - Y^T Y. For a scalar activation its diagonal [..., M], dY_k/dZ2_k.
    """
    if name == "softmax":
        eye = jnp.eye(y.shape[-1], dtype=y.dtype)
        return y[..., :, None] * eye - y[..., :, None] * y[..., None, :]  # [..., M, M]
    if name == "tanh":
        return 1.0 - y * y
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "identity":
        return jnp.ones_like(y)
    raise ValueError(f"output_activation: unknown name {name!r}; allowed: {list(OUTPUT_ACTIVATIONS)}")


def output_vjp(name: str, y: Array, dy: Array, *, materialize: bool = False) -> Array:
    """dDIV/dZ2 = dDIV/dY . dY/dZ2 (row vector times Jacobian), as in the lecture notes.

    Args:
      name: the output activation.
      y: [..., M] outputs Y.
      dy: [..., M] dDIV/dY.
      materialize: if True, build the full M x M Jacobian for a vector activation and multiply by
        it (the lecture notes' Case 1 literally); if False use the equivalent O(M) form
        Y * (dY - <dY, Y>).

    Returns:
      [..., M] dDIV/dZ2.
    """
    if is_vector(name):
        if materialize:
            jac = output_jacobian(name, y)  # [..., M, M]
            return jnp.einsum("...j,...ji->...i", dy, jac)
        return y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True))
    return dy * output_jacobian(name, y)  # diagonal Jacobian: elementwise
