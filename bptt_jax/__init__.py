"""bptt_jax: recurrent networks (Elman, GRU, LSTM) trained by backpropagation through time written out in JAX.

Shape glossary (time-major, batched):
  T  time steps            B  batch size           N  input features
  N1 hidden units (layer)  M  output features      L  stacked layers
  D  directions (2 for a bidirectional network, 1 otherwise)

Per-(layer, direction) tuples (h0, final states, dh0) are ordered layer * D + direction, as PyTorch.
"""

from bptt_jax.bptt import BPTTAux, bptt, loss
from bptt_jax.params import (
    GRUParams,
    LayerParams,
    LSTMParams,
    ReadoutParams,
    RNNParams,
    RNNSpec,
    expected_shapes,
    init_params,
)
from bptt_jax.scan import ForwardOutput, forward, reverse_padded

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
    "reverse_padded",
]

__version__ = "0.1.0"
