"""The network's spec (static) and its parameters (NamedTuple pytrees), with initialisers.

Row-vector convention of the lecture notes: Z1(t) = X(t) W1 + h(t-1) W11 + b1, Z2(t) = h(t) W2 + b2.

Ordering of directions: wherever the package keeps one entry per (layer, direction) -- initial
states ``h0``, final states, hidden-state sequences, ``dh0`` -- the entries are in PyTorch's order,
index ``layer * D + direction`` with D = 2 for a bidirectional network (direction 0 forward,
1 reverse) and D = 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.core import activations, cells, precision
from bptt_jax.core.cells.elman import LayerParams as LayerParams  # the cells' parameter types, re-exported
from bptt_jax.core.cells.gru import GRUParams as GRUParams
from bptt_jax.core.cells.lstm import LSTMParams as LSTMParams

Array = jax.Array

DIVERGENCES = ("cross_entropy", "squared_error", "binary_cross_entropy")
MERGES = ("concat", "sum")
INIT_SCHEMES = ("uniform", "orthogonal", "identity", "normal")


@dataclasses.dataclass(frozen=True)
class RNNSpec:
    """Everything that fixes shapes or control flow; hashable, so it is a static argument to jit.

    Attributes:
      input_size: N, features of X(t).
      hidden_sizes: (N1 of layer 0, N1 of layer 1, ...), one entry per stacked layer.
      output_size: M, features of Y(t).
      activation: f1, one of tanh, relu, sigmoid, identity.
      output_activation: f2, one of softmax (vector), tanh, sigmoid, identity (scalar).
      divergence: Div, one of cross_entropy (needs softmax), squared_error,
        binary_cross_entropy (needs sigmoid).
      bidirectional: if True every layer has a forward and a reverse net.
      merge: how the two directions' states are merged at each t: "concat" (forward first) or "sum".
      cell: "elman" (the lecture notes' layer, default), "gru" or "lstm" (``bptt_jax.core.cells``).
        ``activation`` is the Elman cell's f1; a gated cell takes only its default, "tanh".
      compute_dtype: None (compute in the parameters' dtype), "bfloat16" or "float16" (mixed
        precision: 16-bit matmul operands and stored states, float32 accumulation, carries and
        gradient sums; ``bptt_jax.core.precision`` states the policy) or "float32". A dtype object
        (``jnp.bfloat16``) is taken by its name.
    """

    input_size: int
    hidden_sizes: tuple[int, ...]
    output_size: int
    activation: str = "tanh"
    output_activation: str = "softmax"
    divergence: str = "cross_entropy"
    bidirectional: bool = False
    merge: str = "concat"
    cell: str = "elman"
    compute_dtype: str | None = None

    def __post_init__(self):
        hs = self.hidden_sizes
        if isinstance(hs, int) and not isinstance(hs, bool):
            hs = (hs,)
        if not isinstance(hs, (tuple, list)):
            raise ValueError(f"RNNSpec.hidden_sizes: expected a tuple of positive ints, got {self.hidden_sizes!r}")
        object.__setattr__(self, "hidden_sizes", tuple(hs))
        if len(self.hidden_sizes) == 0:
            raise ValueError("RNNSpec.hidden_sizes: must hold at least one layer size, got ()")
        for name, value in (("input_size", self.input_size), ("output_size", self.output_size)):
            if not _is_pos_int(value):
                raise ValueError(f"RNNSpec.{name}: expected a positive int, got {value!r}")
        for k, n1 in enumerate(self.hidden_sizes):
            if not _is_pos_int(n1):
                raise ValueError(f"RNNSpec.hidden_sizes[{k}]: expected a positive int, got {n1!r}")
        _check_choice("activation", self.activation, sorted(activations.HIDDEN_ACTIVATIONS))
        _check_choice("output_activation", self.output_activation, list(activations.OUTPUT_ACTIVATIONS))
        _check_choice("divergence", self.divergence, list(DIVERGENCES))
        _check_choice("merge", self.merge, list(MERGES))
        _check_choice("cell", self.cell, list(cells.NAMES))
        if self.compute_dtype is not None:
            cd = self.compute_dtype
            if not isinstance(cd, str):
                try:
                    cd = jnp.dtype(cd).name
                except TypeError:
                    pass
            object.__setattr__(self, "compute_dtype", cd)
            _check_choice("compute_dtype", cd, [None, *precision.COMPUTE_DTYPES])
        if self.cell != "elman" and self.activation != "tanh":
            raise ValueError(
                f"RNNSpec.activation: {self.activation!r} applies to the Elman cell only; the {self.cell} cell "
                "has its own gate activations (leave activation at its default, 'tanh')"
            )
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"RNNSpec.bidirectional: expected True or False, got {self.bidirectional!r}")
        if self.divergence == "cross_entropy" and self.output_activation != "softmax":
            raise ValueError(
                "RNNSpec.divergence: 'cross_entropy' needs output_activation='softmax', "
                f"got output_activation={self.output_activation!r}; allowed output activations "
                "for cross_entropy: ['softmax']"
            )
        if self.divergence == "binary_cross_entropy" and self.output_activation != "sigmoid":
            raise ValueError(
                "RNNSpec.divergence: 'binary_cross_entropy' needs output_activation='sigmoid', "
                f"got output_activation={self.output_activation!r}; allowed output activations "
                "for binary_cross_entropy: ['sigmoid']"
            )

    @property
    def num_layers(self) -> int:
        """L, the number of stacked layers."""
        return len(self.hidden_sizes)

    @property
    def num_directions(self) -> int:
        """D: 2 for a bidirectional network, 1 otherwise."""
        return 2 if self.bidirectional else 1

    def merged_size(self, layer: int) -> int:
        """Features of layer ``layer``'s merged states (what the next layer or the readout reads)."""
        n1 = self.hidden_sizes[layer]
        return n1 * 2 if (self.bidirectional and self.merge == "concat") else n1

    def layer_input_size(self, layer: int) -> int:
        """Features of the input of layer ``layer``: N for layer 0, the merged size below otherwise."""
        return self.input_size if layer == 0 else self.merged_size(layer - 1)

    def state_sizes(self) -> tuple[int, ...]:
        """N1 of every (layer, direction) entry, in the order ``layer * D + direction``."""
        return tuple(n1 for n1 in self.hidden_sizes for _ in range(self.num_directions))

    @property
    def is_lstm(self) -> bool:
        """Whether a state entry is an (h, c) pair in the public calls (the LSTM)."""
        return self.cell == "lstm"

    def state_widths(self) -> tuple[int, ...]:
        """W of every (layer, direction) entry inside the package: N1, or 2 N1 for the LSTM ([h | c])."""
        width = cells.get(self.cell).state_width
        return tuple(width(n1) for n1 in self.state_sizes())

    def public_states(self, states: tuple) -> tuple:
        """Internal per-entry states [..., W] as the public calls give them: the arrays themselves,
        or (h, c) pairs for the LSTM. Also for their gradients (dh0 = (dDIV/dh(-1), dDIV/dc(-1)))."""
        if not self.is_lstm:
            return tuple(states)
        return tuple((s[..., : s.shape[-1] // 2], s[..., s.shape[-1] // 2 :]) for s in states)

    def internal_states(self, states: tuple) -> tuple:
        """The inverse of ``public_states`` (shapes already checked)."""
        if not self.is_lstm:
            return tuple(states)
        return tuple(jnp.concatenate([h, c], axis=-1) for h, c in states)

    def state_labels(self) -> tuple[str, ...]:
        """Names of the (layer, direction) entries in the order ``layer * D + direction``, counted
        from 1 as people say them: "layer 1 forward", "layer 1 reverse", "layer 2 forward", ..."""
        names = ("forward", "reverse")[: self.num_directions]
        return tuple(f"layer {k + 1} {d}" for k in range(self.num_layers) for d in names)


def _is_pos_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_choice(field: str, value, allowed: list) -> None:
    if value not in allowed:
        raise ValueError(f"RNNSpec.{field}: unknown value {value!r}; allowed: {allowed}")


class ReadoutParams(NamedTuple):
    """The output layer: Z2(t) = h(t) W2 + b2."""

    w2: Array  # [N_top, M]  W^(2); N_top is the top layer's merged size
    b2: Array  # [M]         b^(2)


class RNNParams(NamedTuple):
    """The whole network.

    ``layers[k]`` is layer k's forward net; ``reverse_layers[k]`` its reverse net (an empty tuple
    for a unidirectional network). A layer is the cell's parameter NamedTuple: ``LayerParams``
    (Elman), ``GRUParams`` or ``LSTMParams``.
    """

    layers: tuple[Any, ...]
    reverse_layers: tuple[Any, ...]
    readout: ReadoutParams


def expected_shapes(spec: RNNSpec) -> RNNParams:
    """The shape of every parameter array, as an ``RNNParams`` of tuples."""

    readout_tree: Any = ReadoutParams  # the NamedTuples as trees of shape tuples, not of arrays
    cell = cells.get(spec.cell)

    def layer(k):
        return cell.shapes(spec.layer_input_size(k), spec.hidden_sizes[k])

    layers = tuple(layer(k) for k in range(spec.num_layers))
    reverse = layers if spec.bidirectional else ()
    top = spec.merged_size(spec.num_layers - 1)
    return RNNParams(layers, reverse, readout_tree((top, spec.output_size), (spec.output_size,)))


def check_params(params, spec: RNNSpec) -> None:
    """Raises ValueError naming the first parameter whose structure or shape does not match spec."""
    if not isinstance(params, RNNParams):
        raise ValueError(f"params: expected an RNNParams, got {type(params).__name__}")
    want = expected_shapes(spec)
    for field in ("layers", "reverse_layers"):
        got, exp = getattr(params, field), getattr(want, field)
        if len(got) != len(exp):
            raise ValueError(
                f"params.{field}: expected {len(exp)} layers for spec "
                f"(hidden_sizes={spec.hidden_sizes}, bidirectional={spec.bidirectional}), got {len(got)}"
            )
        for k, (g, e) in enumerate(zip(got, exp)):
            if not isinstance(g, type(e)):
                raise ValueError(
                    f"params.{field}[{k}]: expected a {type(e).__name__} for spec.cell={spec.cell!r}, "
                    f"got {type(g).__name__}"
                )
            for name, arr, shape in zip(type(e)._fields, g, e):
                _check_shape(f"params.{field}[{k}].{name}", arr, shape)
    for name, arr, shape in zip(ReadoutParams._fields, params.readout, want.readout):
        _check_shape(f"params.readout.{name}", arr, shape)


def _check_shape(name: str, arr, shape) -> None:
    got = getattr(arr, "shape", None)
    if got is None or tuple(got) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {got}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {arr.dtype}")


def init_params(
    key: Array,
    spec: RNNSpec,
    *,
    scheme: str = "uniform",
    scale: float = 1.0,
    dtype=jnp.float32,
    forget_bias: float = 0.0,
) -> RNNParams:
    """Initial parameters for ``spec``.

    Args:
      key: PRNG key, split once per array.
      spec: the network.
      scheme: "uniform": every weight and bias U(-1/sqrt(N1), 1/sqrt(N1)) as PyTorch's nn.RNN (the
        readout uses its input size, as nn.Linear); "orthogonal": as uniform but W11 a random
        orthogonal matrix times ``scale``; "identity": W11 = scale * I and zero b1 (the IRNN of
        Le, Jaitly & Hinton 2015, with relu), W1 ~ N(0, 0.001^2) as in that paper;
        "normal": every weight N(0, scale^2) and zero biases (min-char-rnn uses scale=0.01).
      scale: see ``scheme``.
      dtype: float dtype of every array.
      forget_bias: the LSTM's forget-gate bias (bx_f = forget_bias, bh_f = 0); 0 keeps PyTorch's
        uniform biases. Gated cells (GRU, LSTM) take "uniform" (PyTorch's default), "orthogonal" (Wh's
        gate blocks orthogonal) and "normal"; "identity" is the Elman cell's IRNN only.

    Returns:
      An ``RNNParams`` whose shapes are ``expected_shapes(spec)``.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme: unknown value {scheme!r}; allowed: {list(INIT_SCHEMES)}")
    if scheme == "identity" and spec.cell != "elman":
        raise ValueError(f"scheme: 'identity' (the IRNN) is for the Elman cell, got spec.cell={spec.cell!r}")
    if forget_bias and spec.cell != "lstm":
        raise ValueError(f"forget_bias: applies to the LSTM cell only, got spec.cell={spec.cell!r}")
    cell = cells.get(spec.cell)
    shapes = expected_shapes(spec)
    is_shape = lambda x: isinstance(x, tuple) and len(x) > 0 and all(isinstance(i, int) for i in x)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=is_shape)
    keys = jax.random.split(key, len(leaves))
    key_tree = jax.tree_util.tree_unflatten(treedef, list(keys))

    def make_layer(k, shp: Any, keys: Any):  # shp: shape tuples, keys: PRNG keys
        return cell.init(keys, shp, scheme=scheme, scale=scale, dtype=dtype, forget_bias=forget_bias)

    layers = tuple(make_layer(k, s, kk) for k, (s, kk) in enumerate(zip(shapes.layers, key_tree.layers)))
    reverse = tuple(
        make_layer(k, s, kk) for k, (s, kk) in enumerate(zip(shapes.reverse_layers, key_tree.reverse_layers))
    )
    ro: Any = shapes.readout  # shape tuples
    n_top = ro.w2[0]
    if scheme == "normal":
        readout = ReadoutParams(
            scale * jax.random.normal(key_tree.readout.w2, ro.w2, dtype),
            jnp.zeros(ro.b2, dtype),
        )
    else:
        bound = 1.0 / math.sqrt(n_top)
        readout = ReadoutParams(
            jax.random.uniform(key_tree.readout.w2, ro.w2, dtype, -bound, bound),
            jax.random.uniform(key_tree.readout.b2, ro.b2, dtype, -bound, bound),
        )
    return RNNParams(layers, reverse, readout)
