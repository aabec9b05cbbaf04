"""bptt_jax: recurrent networks (Elman, GRU, LSTM) trained by backpropagation through time written out in JAX.

Shape glossary (time-major, batched):
  T  time steps            B  batch size           N  input features
  N1 hidden units (layer)  M  output features      L  stacked layers
  D  directions (2 for a bidirectional network, 1 otherwise)

Per-(layer, direction) tuples (h0, final states, dh0) are ordered layer * D + direction, as PyTorch.

The package is in layers (imports go down only): ``bptt_jax.core`` (cells, forward unrolling, the
plan, the explicit BPTT, the custom VJP), ``bptt_jax.layers`` (Flax NNX, Equinox, PyTorch interop),
``bptt_jax.training`` (train step, data parallelism, checkpoints, sampling) and
``bptt_jax.command`` (the ``bptt-jax`` command).
"""

from bptt_jax.core.forward import ForwardOutput, forward, reverse_padded
from bptt_jax.core.gradient import BPTTAux, bptt, loss, loss_and_state
from bptt_jax.core.params import (
    GRUParams,
    LayerParams,
    LSTMParams,
    ReadoutParams,
    RNNParams,
    RNNSpec,
    expected_shapes,
    init_params,
)
from bptt_jax.core.tune import tune, tune_states

__all__ = [
    "BPTTAux",
    "ForwardOutput",
    "GRUParams",
    "LayerParams",
    "LSTMParams",
    "ReadoutParams",
    "RNNParams",
    "RNNSpec",
    "bptt",
    "expected_shapes",
    "forward",
    "init_params",
    "loss",
    "loss_and_state",
    "reverse_padded",
    "tune",
    "tune_states",
]

__version__ = "0.2.0"
