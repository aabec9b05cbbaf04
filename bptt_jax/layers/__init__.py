"""Layers for other JAX libraries, backed by the explicit BPTT (``bptt_jax.core.vjp.rnn_states``).

One module per library, imported by name so that the core package never imports them:

    from bptt_jax.layers import nnx as bnnx      # needs flax     (pip install 'bptt-jax[flax]')
    from bptt_jax.layers import equinox as beqx  # needs equinox  (pip install 'bptt-jax[equinox]')
"""
