"""Sampling text from a trained character model, one ``lax.scan`` over the generated steps."""

from __future__ import annotations

import functools

import jax
from jax import lax

from bptt_jax.core import cells, forward, precision
from bptt_jax.core.params import RNNParams, RNNSpec


@functools.partial(jax.jit, static_argnames=("spec", "length"))
def sample_ids(key, params: RNNParams, spec: RNNSpec, prime_xs, length: int, temperature):
    """Runs the prime through the network, then samples ``length`` symbols one step at a time.

    Args:
      key: PRNG key.
      prime_xs: [P, 1, V] one-hot prime (P >= 1).
      length: symbols to generate.
      temperature: divides the logits before sampling.

    Returns:
      [length] int32 sampled symbol ids.
    """
    if spec.bidirectional:
        raise ValueError("spec.bidirectional: a bidirectional network cannot generate left to right")
    out = forward.forward(params, spec, prime_xs)
    v = spec.input_size
    params = precision.to_compute(spec.compute_dtype, params)  # the steps below in spec.compute_dtype

    cell = cells.get(spec.cell)

    def body(carry, key_t):
        ss, z2 = carry  # ss: one internal state [1, W] per layer
        sym = jax.random.categorical(key_t, z2 / temperature)  # [1]
        x = jax.nn.one_hot(sym, v, dtype=params.readout.w2.dtype)  # [1, V]
        new = []
        for k, layer in enumerate(params.layers):  # layers, not time
            s = cell.recur(layer, spec.activation, ss[k], cell.project(layer, x))  # one step of the cell
            new.append(s)
            x = cell.hidden(s)
        z2 = precision.mm(x, params.readout.w2) + params.readout.b2
        return (tuple(new), z2), sym[0]

    start = precision.to_compute(spec.compute_dtype, spec.internal_states(out.h_last))
    _, syms = lax.scan(body, (start, out.z2s[-1]), jax.random.split(key, length))
    return syms
