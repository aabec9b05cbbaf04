"""Moved to ``bptt_jax.layers.torch`` (0.2.0); this alias goes in 0.3."""

from bptt_jax import _moved

_moved.alias(__name__, "bptt_jax.layers.torch")
