"""Weights to and from PyTorch's layout, in plain NumPy (the library never imports torch).

The layout is that of
``torch.nn.ModuleDict({"rnn": torch.nn.RNN(N, N1, num_layers=L, nonlinearity=f1,
bidirectional=bidir), "readout": torch.nn.Linear(D*N1, M)}).state_dict()``, with ``torch.nn.GRU`` or
``torch.nn.LSTM`` (same arguments, no nonlinearity) for ``spec.cell`` "gru" or "lstm".
PyTorch uses column vectors (h W^T); the lecture notes and this package use row vectors (h W), so

    Elman:  W1 = weight_ih^T    W11 = weight_hh^T    b1 = bias_ih + bias_hh    W2 = readout.weight^T
    GRU, LSTM: Wx = weight_ih^T  Wh = weight_hh^T    bx = bias_ih    bh = bias_hh   (gate orders as PyTorch's)

Elman export puts b1 in bias_ih and zeros in bias_hh. The gated cells keep both biases as they are:
the GRU's b_hn sits inside r * (h W_hn + b_hn) and cannot be folded into b_in.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bptt_jax.core import cells
from bptt_jax.core.params import LayerParams, ReadoutParams, RNNParams, RNNSpec, check_params

TORCH_MODULES = {"elman": "torch.nn.RNN", "gru": "torch.nn.GRU", "lstm": "torch.nn.LSTM"}


def _check_exportable(spec: RNNSpec) -> None:
    if spec.cell == "elman" and spec.activation not in ("tanh", "relu"):
        raise ValueError(
            f"spec.activation: torch.nn.RNN supports nonlinearity 'tanh' or 'relu', got {spec.activation!r}"
        )
    module = TORCH_MODULES[spec.cell]
    if len(set(spec.hidden_sizes)) != 1:
        raise ValueError(
            f"spec.hidden_sizes: {module} needs the same hidden size in every layer, got {spec.hidden_sizes}"
        )
    if spec.bidirectional and spec.merge != "concat":
        raise ValueError(
            f"spec.merge: {module} concatenates the two directions, so only merge='concat' maps to it, "
            f"got {spec.merge!r}"
        )


def expected_torch_shapes(spec: RNNSpec) -> dict[str, tuple[int, ...]]:
    """Every key of the PyTorch state dict with its shape, in state_dict order."""
    _check_exportable(spec)
    shapes: dict[str, tuple[int, ...]] = {}
    g = cells.get(spec.cell).GATES
    for k in range(spec.num_layers):
        n1, n_in = spec.hidden_sizes[k], spec.layer_input_size(k)
        for sfx in ("", "_reverse")[: spec.num_directions]:
            shapes[f"rnn.weight_ih_l{k}{sfx}"] = (g * n1, n_in)
            shapes[f"rnn.weight_hh_l{k}{sfx}"] = (g * n1, n1)
            shapes[f"rnn.bias_ih_l{k}{sfx}"] = (g * n1,)
            shapes[f"rnn.bias_hh_l{k}{sfx}"] = (g * n1,)
    top = spec.merged_size(spec.num_layers - 1)
    shapes["readout.weight"] = (spec.output_size, top)
    shapes["readout.bias"] = (spec.output_size,)
    return shapes


def to_torch_state_dict(params: RNNParams, spec: RNNSpec) -> dict[str, np.ndarray]:
    """params -> {key: numpy array} in PyTorch's layout (load with ``torch.from_numpy``)."""
    _check_exportable(spec)
    check_params(params, spec)
    out: dict[str, np.ndarray] = {}
    for k in range(spec.num_layers):
        for sfx, layer in zip(("", "_reverse"), (params.layers[k],) + tuple(params.reverse_layers[k : k + 1])):
            if spec.cell == "elman":
                out[f"rnn.weight_ih_l{k}{sfx}"] = np.array(layer.w1).T.copy()
                out[f"rnn.weight_hh_l{k}{sfx}"] = np.array(layer.w11).T.copy()
                out[f"rnn.bias_ih_l{k}{sfx}"] = np.array(layer.b1).copy()
                out[f"rnn.bias_hh_l{k}{sfx}"] = np.zeros_like(np.array(layer.b1))
            else:
                out[f"rnn.weight_ih_l{k}{sfx}"] = np.array(layer.wx).T.copy()
                out[f"rnn.weight_hh_l{k}{sfx}"] = np.array(layer.wh).T.copy()
                out[f"rnn.bias_ih_l{k}{sfx}"] = np.array(layer.bx).copy()
                out[f"rnn.bias_hh_l{k}{sfx}"] = np.array(layer.bh).copy()
    out["readout.weight"] = np.array(params.readout.w2).T.copy()
    out["readout.bias"] = np.array(params.readout.b2).copy()
    return out


def from_torch_state_dict(state, spec: RNNSpec, *, dtype=jnp.float32) -> RNNParams:
    """{key: array} in PyTorch's layout -> params. Missing, extra or misshapen keys raise ValueError.

    Values may be numpy arrays or anything ``np.asarray`` takes (torch tensors: call
    ``.detach().numpy()`` first, or pass them directly if on the CPU).
    """
    shapes = expected_torch_shapes(spec)
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    if missing:
        raise ValueError(f"state: missing keys {missing}")
    if extra:
        raise ValueError(f"state: unexpected keys {extra}; expected exactly {list(shapes)}")
    arrs = {}
    for key, shape in shapes.items():
        a = np.asarray(state[key])
        if a.shape != shape:
            raise ValueError(f"state[{key!r}]: expected shape {shape}, got {a.shape}")
        arrs[key] = a

    def layer(k, sfx):
        if spec.cell != "elman":
            return cells.get(spec.cell).Params(
                jnp.asarray(arrs[f"rnn.weight_ih_l{k}{sfx}"].T, dtype),
                jnp.asarray(arrs[f"rnn.weight_hh_l{k}{sfx}"].T, dtype),
                jnp.asarray(arrs[f"rnn.bias_ih_l{k}{sfx}"], dtype),
                jnp.asarray(arrs[f"rnn.bias_hh_l{k}{sfx}"], dtype),
            )
        return LayerParams(
            jnp.asarray(arrs[f"rnn.weight_ih_l{k}{sfx}"].T, dtype),
            jnp.asarray(arrs[f"rnn.weight_hh_l{k}{sfx}"].T, dtype),
            jnp.asarray(arrs[f"rnn.bias_ih_l{k}{sfx}"] + arrs[f"rnn.bias_hh_l{k}{sfx}"], dtype),
        )

    layers = tuple(layer(k, "") for k in range(spec.num_layers))
    reverse = tuple(layer(k, "_reverse") for k in range(spec.num_layers)) if spec.bidirectional else ()
    readout = ReadoutParams(jnp.asarray(arrs["readout.weight"].T, dtype), jnp.asarray(arrs["readout.bias"], dtype))
    return RNNParams(layers, reverse, readout)
