"""The pure one-step function of an Elman layer: h(t) = f1(X(t) W1 + h(t-1) W11 + b1)."""

from __future__ import annotations

import jax

from bptt_jax import activations
from bptt_jax.params import LayerParams

Array = jax.Array


def step(layer: LayerParams, activation: str, h_tm1: Array, x_t: Array) -> Array:
    """One time step, as written in the lecture notes.

    Args:
      layer: W1 [N, N1], W11 [N1, N1], b1 [N1].
      activation: f1's name.
      h_tm1: [B, N1] h(t-1).
      x_t: [B, N] X(t).

    Returns:
      [B, N1] h(t) = f1(Z1(t)), Z1(t) = X(t) W1 + h(t-1) W11 + b1.
    """
    return recur(layer.w11, activation, h_tm1, x_t @ layer.w1 + layer.b1)


def recur(w11: Array, activation: str, h_tm1: Array, u_t: Array) -> Array:
    """The recurrent half of ``step``, for scans whose input projection is hoisted out of the loop.

    Args:
      w11: [N1, N1] W11.
      activation: f1's name.
      h_tm1: [B, N1] h(t-1).
      u_t: [B, N1] X(t) W1 + b1, computed for all t at once before the scan.

    Returns:
      [B, N1] h(t) = f1(u_t + h(t-1) W11).
    """
    return activations.hidden(activation).f(u_t + h_tm1 @ w11)
