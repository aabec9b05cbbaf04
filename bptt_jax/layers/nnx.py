"""A Flax NNX recurrent layer whose backward pass is the explicit, time-blocked BPTT::

    from bptt_jax.layers import nnx as bnnx
    layer = bnnx.RNN(16, 32, cell="lstm", rngs=nnx.Rngs(0))        # instead of nnx.RNN(nnx.OptimizedLSTMCell(...))
    ys = layer(xs)                                                  # xs [*batch, T, N] -> [*batch, T, N1]
    carry, ys = layer(xs, seq_lengths=lengths, return_carry=True)   # carry: h, or (c, h) for the LSTM
    layer = bnnx.RNN.from_flax_cell(nnx.GRUCell(16, 32, rngs=rngs)) # the same weights, our backward

``RNN`` takes ``nnx.RNN``'s options and call signature (batch-major by default, any number of
leading batch dimensions, ``time_major``, ``reverse`` with and without ``keep_order``,
``seq_lengths``, ``return_carry``, ``initial_carry``, ``rngs``), so it works where ``nnx.RNN``
does, inside ``nnx.Bidirectional`` too. ``jax.grad`` / ``nnx.grad`` of anything computed from its
outputs and its final carry runs ``bptt_jax.core.vjp.rnn_states``'s custom VJP: the reverse scan of the
lecture notes, not autodiff of the forward scan.

Each weight is one ``nnx.Param`` named after the notation (Elman: ``w1`` [N, N1], ``w11``
[N1, N1], ``b1`` [N1]; GRU and LSTM: ``wx`` [N, G N1], ``wh`` [N1, G N1], ``bx``, ``bh`` [G N1],
PyTorch's gate orders r|z|n and i|f|g|o); the arrays, never the ``Param`` objects, go into the
custom VJP, and the layer holds no readout (nothing for weight decay to move). ``biases`` says which
biases are Params (``bptt_jax.layers.biases``): PyTorch's two per gate ("pytorch", the default of a
layer built here), or exactly the Flax cell's ("flax", what ``from_flax_cell`` gives: ``nnx.GRUCell``
has bx only, the LSTM cells bh only), so that a switched model trains step for step as before.

Differences from ``nnx.RNN``, on purpose: steps past a sequence's length hold the state (and its
output repeats the last valid one), where Flax keeps stepping over the padding; valid steps and
final carries agree. No RNG stream is needed to build the zero carry. ``seq_lengths`` must be
integers, and where they live on the host (NumPy, lists) in [0, T] (a named error otherwise);
device arrays are not read back to check them. The GRU keeps PyTorch's
b_hn inside r * (h W_hn + b_hn) in the "pytorch" layout (``nnx.GRUCell`` has no recurrent bias at all).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bptt_jax.core import cells, checks, forward, kernels, vjp
from bptt_jax.core.params import ReadoutParams, RNNParams, RNNSpec, init_params
from bptt_jax.core.tune import tune_states
from bptt_jax.core.vjp import rnn_states
from bptt_jax.layers import biases as bias_layouts

Array = jax.Array

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class RNN(nnx.Module):
    """One recurrent layer (Elman, GRU or LSTM) with ``nnx.RNN``'s interface and the explicit BPTT.

    Args:
      in_features: N, the input width.
      hidden_features: N1, the state width.
      cell: "elman", "gru" or "lstm".
      activation: the Elman cell's f1 ("tanh", "relu", ... as ``RNNSpec``); gated cells use tanh.
      time_major, return_carry, reverse, keep_order: ``nnx.RNN``'s defaults, overridable per call.
      unroll: scan steps per loop iteration; None picks by backend (1 on a CPU, 8 on a GPU).
      recurrence: "auto", "scan", "pallas" or "native", as ``bptt_jax.bptt``.
      grad: "bptt" (the explicit BPTT, the default) or "autodiff" (``jax.grad`` differentiates the
        forward scan itself: the same layer as an oracle, as the config key ``train.grad``).
      init, init_scale, forget_bias: the initialisation, as ``bptt_jax.init_params``.
      dtype: the computation's dtype, as Flax's cells: inputs, weights and states are cast to it (the
        gradients come back in ``param_dtype``); None: the promotion of the inputs' and weights' dtypes.
      param_dtype: the weights' dtype.
      compute_dtype: the explicit BPTT's mixed precision (``RNNSpec.compute_dtype``: None,
        "bfloat16", "float16" or "float32"): the matmuls in that dtype accumulated in float32, the
        states stored in it, the gradients summed in float32 and returned in ``param_dtype``
        (docs/howto/precision.md). Unlike ``dtype`` it keeps the weights and the carry in their dtype;
        the outputs (the states) come in the compute dtype.
      biases: which biases are Params: "pytorch" (bx and bh), "flax" (the Flax cell's), "equinox"
        (``bptt_jax.layers.biases``); the others are zeros, not trained.
      gates: "auto", "store" or "recompute": the gated cells' gates kept for the backward pass or
        recomputed there, as ``bptt_jax.core.vjp.rnn_states``.
      max_memory: a budget for the temp memory of the layer's forward + backward (bytes or "512MiB"),
        as ``rnn_states``: the fastest of its plans that fits, chosen once per input shape.
      checkpoint_every: k, checkpoint segments of the backward pass, as ``rnn_states`` (a k that
        does not divide the sequence length fills the last segment up with held steps; a tuple
        (k1, k2, ...) nests them); None: none.
      rngs: ``nnx.Rngs``; its ``params`` stream draws the weights.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        cell: str = "elman",
        activation: str = "tanh",
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll: int | None = None,
        recurrence: str = "auto",
        grad: str = "bptt",
        init: str = "uniform",
        init_scale: float = 1.0,
        forget_bias: float = 0.0,
        dtype=None,
        param_dtype=jnp.float32,
        compute_dtype=None,
        biases: str = "pytorch",
        gates: str = "auto",
        max_memory: int | str | None = None,
        checkpoint_every: int | tuple[int, ...] | None = None,
        rngs: nnx.Rngs,
    ):
        bias_layouts.check_layout(biases)
        self.dtype = dtype
        self.spec = RNNSpec(
            in_features, (hidden_features,), 1, activation=activation, cell=cell, compute_dtype=compute_dtype
        )
        self.gates, self.max_memory, self.checkpoint_every = vjp.check_memory_options(
            gates, max_memory, checkpoint_every
        )
        self.in_features, self.hidden_features, self.cell = in_features, hidden_features, cell
        self.time_major, self.return_carry = time_major, return_carry
        self.reverse, self.keep_order = reverse, keep_order
        self.unroll, self.recurrence = unroll, kernels.check_recurrence(recurrence)
        vjp.check_grad(grad)
        self.grad, self.biases = grad, biases
        params = init_params(
            rngs.params(), self.spec, scheme=init, scale=init_scale, dtype=param_dtype, forget_bias=forget_bias
        )
        for name, value in bias_layouts.split(cell, biases, params.layers[0]).items():
            setattr(self, name, nnx.Param(value))

    # ------------------------------------------------------------------ the weights as the library's types

    def layer_params(self):
        """The weights as the cell's parameter NamedTuple of plain arrays (``LayerParams``, ...)."""
        names = bias_layouts.names(self.cell, self.biases)
        return bias_layouts.join(self.cell, self.biases, {name: getattr(self, name)[...] for name in names})

    def _params(self, dtype) -> RNNParams:
        # rnn_states ignores the readout: a constant, not a Param (weight decay would move a Param)
        readout = ReadoutParams(jnp.zeros((self.hidden_features, 1), dtype), jnp.zeros((1,), dtype))
        return _cast(RNNParams((self.layer_params(),), (), readout), self.dtype)

    # ------------------------------------------------------------------ carries

    def initialize_carry(self, input_shape, rngs=None):
        """Zeros for a batch of ``input_shape`` = ``(*batch, N)``: h ``[*batch, N1]``, or (c, h) for
        the LSTM (Flax's order). ``rngs`` is accepted for ``nnx.RNN``'s signature and not used."""
        h = jnp.zeros((*tuple(input_shape)[:-1], self.hidden_features), self.dtype or self.layer_params()[0].dtype)
        return (h, h) if self.cell == "lstm" else h

    # ------------------------------------------------------------------ the call

    def __call__(
        self,
        inputs: Array,
        *,
        initial_carry=None,
        seq_lengths: Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        rngs: Any = None,
    ):
        """``nnx.RNN.__call__``: inputs ``[*batch, T, N]`` (time_major: ``[T, *batch, N]``) -> outputs of
        the same layout with N1 features, or (carry, outputs) with ``return_carry``. ``rngs`` is not used."""
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        params, x, h0, lengths, batch_dims = self._arguments(inputs, initial_carry, seq_lengths, time_major, reverse)
        states, h_last = rnn_states(params, self.spec, x, h0=h0, lengths=lengths, return_last=True, **self._options())
        if reverse and keep_order:
            states = forward.reverse_padded(states, lengths)
        outputs = _batch_layout(states, batch_dims, time_major)
        if not return_carry:
            return outputs
        last = h_last[0]
        if self.cell == "lstm":
            h, c = last
            return (c.reshape(*batch_dims, -1), h.reshape(*batch_dims, -1)), outputs
        return last.reshape(*batch_dims, -1), outputs

    def _arguments(self, inputs, initial_carry, seq_lengths, time_major: bool, reverse: bool):
        """(params, xs [T, B, N], h0, lengths, the batch dimensions): ``rnn_states``' arguments."""
        x, batch_dims, lengths = _time_major(_cast(inputs, self.dtype), self.in_features, time_major, seq_lengths)
        if reverse:  # as Flax's flip_sequences on the valid steps: the first becomes the last
            x = forward.reverse_padded(x, lengths)
        if initial_carry is None:
            initial_carry = self.initialize_carry((*batch_dims, self.in_features))
        h0 = self._h0(_cast(initial_carry, self.dtype), batch_dims, x.shape[1])
        return self._params(x.dtype), x, h0, lengths, batch_dims

    def _options(self) -> dict:
        return _layer_options(self)

    def tune(
        self, inputs: Array, *, initial_carry=None, seq_lengths: Array | None = None, time_major=None, **tune_options
    ):
        """Measures this layer's explicit BPTT plans for inputs of this shape on this machine and
        caches the fastest (``bptt_jax.tune_states``; ``tune_options``: its ``time_budget``,
        ``rounds``, ``progress``, ``record``): later calls with inputs of the same shape and the
        same layer options run it, once they are traced (a function jitted before keeps its plan
        until it traces again). Arguments as ``__call__``; returns the plan."""
        time_major = self.time_major if time_major is None else time_major
        params, x, h0, lengths, _ = self._arguments(inputs, initial_carry, seq_lengths, time_major, False)
        return _tune(params, self.spec, x, h0, lengths, self._options(), tune_options)

    def _h0(self, carry, batch_dims, b):
        shape = (*batch_dims, self.hidden_features)

        def flat(a, what):
            a = jnp.asarray(a)
            if a.shape != shape:
                raise ValueError(f"initial_carry: {what} must have shape {shape}, got {a.shape}")
            return a.reshape(b, self.hidden_features)

        if self.cell == "lstm":
            if not (isinstance(carry, (tuple, list)) and len(carry) == 2):
                raise ValueError("initial_carry: the LSTM's carry is a pair (c, h) (Flax's order)")
            c, h = carry
            return ((flat(h, "h"), flat(c, "c")),)
        return (flat(carry, "h"),)

    # ------------------------------------------------------------------ to and from Flax's cells

    @classmethod
    def from_flax_cell(cls, flax_cell, **kwargs) -> RNN:
        """A layer with the weights of ``nnx.SimpleCell``, ``nnx.GRUCell``, ``nnx.OptimizedLSTMCell``
        or ``nnx.LSTMCell`` (gate orders and biases mapped exactly; keyword options as ``RNN``). Its
        Params are exactly the cell's (``biases="flax"``), so training it with any optax optimizer
        equals training ``nnx.RNN(cell)``; ``biases="pytorch"`` gives PyTorch's two biases instead.
        Refuses, by name, cells whose computation this layer does not have (another gate function,
        a residual SimpleCell, an activation other than tanh / relu)."""
        name = type(flax_cell).__name__
        n, n1 = flax_cell.in_features, flax_cell.hidden_features
        kinds = {"SimpleCell": "elman", "GRUCell": "gru", "OptimizedLSTMCell": "lstm", "LSTMCell": "lstm"}
        if name not in kinds:
            raise ValueError(
                f"from_flax_cell: expected nnx.SimpleCell, GRUCell, OptimizedLSTMCell or LSTMCell, got {name}"
            )
        cell = kinds[name]
        act = _activation_name(flax_cell.activation_fn)
        if cell != "elman":
            if act != "tanh" or flax_cell.gate_fn not in (jax.nn.sigmoid, nnx.sigmoid):
                raise ValueError(f"from_flax_cell: {name} must use sigmoid gates and tanh (PyTorch's cell)")
        elif getattr(flax_cell, "residual", False):
            raise ValueError("from_flax_cell: a residual SimpleCell (h + f1(...)) is not the lecture notes' cell")
        if act is None:
            raise ValueError(
                f"from_flax_cell: activation {flax_cell.activation_fn!r} is not one of {sorted(_ACTIVATIONS)}"
            )
        if cell == "elman":
            kwargs.setdefault("activation", act)
        kwargs.setdefault("biases", "flax")  # exactly the Flax cell's Params: it trains as nnx.RNN(cell)
        kwargs.setdefault("param_dtype", jax.tree_util.tree_leaves(nnx.state(flax_cell, nnx.Param))[0].dtype)
        kwargs.setdefault("dtype", getattr(flax_cell, "dtype", None))
        layer = cls(n, n1, cell=cell, rngs=nnx.Rngs(0), **kwargs)
        get = lambda mod, attr="kernel": jnp.asarray(getattr(mod, attr)[...])  # noqa: E731
        values: tuple[Array, ...]
        if name == "SimpleCell":
            values = (get(flax_cell.dense_i), get(flax_cell.dense_h), get(flax_cell.dense_i, "bias"))
        elif name == "GRUCell":
            bx = get(flax_cell.dense_i, "bias")
            values = (get(flax_cell.dense_i), get(flax_cell.dense_h), bx, jnp.zeros_like(bx))
        elif name == "OptimizedLSTMCell":
            bh = get(flax_cell.dense_h, "bias")
            values = (get(flax_cell.dense_i), get(flax_cell.dense_h), jnp.zeros_like(bh), bh)
        else:
            gates = ("i", "f", "g", "o")
            wx = jnp.concatenate([get(getattr(flax_cell, "if_" if g == "f" else f"i{g}")) for g in gates], -1)
            wh = jnp.concatenate([get(getattr(flax_cell, f"h{g}")) for g in gates], -1)
            bh = jnp.concatenate([get(getattr(flax_cell, f"h{g}"), "bias") for g in gates], -1)
            values = (wx, wh, jnp.zeros_like(bh), bh)
        full = cells.get(cell).Params(*values)
        for attr, value in bias_layouts.split(cell, layer.biases, full).items():
            getattr(layer, attr)[...] = value
        return layer

    def to_flax_cell(self, *, rngs: nnx.Rngs | None = None):
        """The Flax cell with these weights: ``nnx.SimpleCell``, ``nnx.GRUCell`` or
        ``nnx.OptimizedLSTMCell`` (use it with ``nnx.RNN``). A GRU with a non-zero b_hn has no such
        cell (``nnx.GRUCell`` has no recurrent bias): ValueError."""
        rngs = nnx.Rngs(0) if rngs is None else rngs
        p = self.layer_params()
        dtypes = {"dtype": self.dtype, "param_dtype": p[0].dtype}
        n, n1 = self.in_features, self.hidden_features
        fc: Any
        if self.cell == "elman":
            fc = nnx.SimpleCell(n, n1, activation_fn=_ACTIVATIONS[self.spec.activation], rngs=rngs, **dtypes)
            _set(fc.dense_i, kernel=p.w1, bias=p.b1)
            _set(fc.dense_h, kernel=p.w11)
        elif self.cell == "gru":
            b_hn = np.asarray(p.bh[2 * n1 :])
            if np.any(b_hn != 0):
                raise ValueError(
                    "to_flax_cell: this GRU has a non-zero b_hn (inside r * (h W_hn + b_hn)); nnx.GRUCell has no "
                    "recurrent bias, so no Flax cell computes it"
                )
            fc = nnx.GRUCell(n, n1, rngs=rngs, **dtypes)
            _set(fc.dense_i, kernel=p.wx, bias=p.bx + p.bh)  # r, z: only the sum matters; n: b_hn is zero
            _set(fc.dense_h, kernel=p.wh)
        else:
            fc = nnx.OptimizedLSTMCell(n, n1, rngs=rngs, **dtypes)
            _set(fc.dense_i, kernel=p.wx)
            _set(fc.dense_h, kernel=p.wh, bias=p.bx + p.bh)
        return fc


class _Weights(nnx.Module):
    """One (layer, direction) entry's weights, one ``nnx.Param`` per array named after the notation."""

    def __init__(self, cell: str, layer, biases: str):
        self.cell, self.biases = cell, biases
        for name, value in bias_layouts.split(cell, biases, layer).items():
            setattr(self, name, nnx.Param(value))

    def params(self):
        names = bias_layouts.names(self.cell, self.biases)
        return bias_layouts.join(self.cell, self.biases, {name: getattr(self, name)[...] for name in names})


class StackedRNN(nnx.Module):
    """A whole stack of recurrent layers (``RNNSpec``'s: several layers, optionally bidirectional)
    in one call and one custom VJP, instead of one ``RNN`` (and one VJP) per layer and direction.

    Args:
      in_features: N.
      hidden_sizes: N1 of each layer, bottom first.
      cell, activation, unroll, recurrence, grad, init, init_scale, forget_bias: as ``RNN``.
      dtype, param_dtype, compute_dtype, biases, gates, max_memory, checkpoint_every: as ``RNN``
        (``max_memory`` budgets the whole stack's forward + backward).
      bidirectional: each layer also runs a reverse net; merge: "concat" (forward first) or "sum",
        how the two directions' states are combined for the next layer and the output.
      time_major: the default layout, overridable per call.
      rngs: ``nnx.Rngs``; its ``params`` stream draws the weights.

    The weights: ``layers[k]`` (and ``reverse_layers[k]``) hold layer k's Params. The carry, in and
    out, is a tuple with one entry per layer and direction (order layer * D + direction): h, or
    (c, h) for the LSTM as in ``RNN``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes,
        *,
        cell: str = "elman",
        activation: str = "tanh",
        bidirectional: bool = False,
        merge: str = "concat",
        time_major: bool = False,
        unroll: int | None = None,
        recurrence: str = "auto",
        grad: str = "bptt",
        init: str = "uniform",
        init_scale: float = 1.0,
        forget_bias: float = 0.0,
        dtype=None,
        param_dtype=jnp.float32,
        compute_dtype=None,
        biases: str = "pytorch",
        gates: str = "auto",
        max_memory: int | str | None = None,
        checkpoint_every: int | tuple[int, ...] | None = None,
        rngs: nnx.Rngs,
    ):
        vjp.check_grad(grad)
        bias_layouts.check_layout(biases)
        self.dtype = dtype
        self.spec = RNNSpec(
            in_features,
            tuple(hidden_sizes),
            1,
            activation=activation,
            cell=cell,
            bidirectional=bidirectional,
            merge=merge,
            compute_dtype=compute_dtype,
        )
        self.gates, self.max_memory, self.checkpoint_every = vjp.check_memory_options(
            gates, max_memory, checkpoint_every
        )
        self.time_major, self.unroll, self.grad = time_major, unroll, grad
        self.recurrence = kernels.check_recurrence(recurrence)
        params = init_params(
            rngs.params(), self.spec, scheme=init, scale=init_scale, dtype=param_dtype, forget_bias=forget_bias
        )
        self.layers = nnx.List([_Weights(cell, layer, biases) for layer in params.layers])
        self.reverse_layers = nnx.List([_Weights(cell, layer, biases) for layer in params.reverse_layers])

    @property
    def out_features(self) -> int:
        return self.spec.merged_size(self.spec.num_layers - 1)

    def __call__(
        self, inputs: Array, *, initial_carry=None, seq_lengths=None, return_carry: bool = False, time_major=None
    ):
        """inputs ``[*batch, T, N]`` (time_major: ``[T, *batch, N]``) -> the top layer's merged states
        (``out_features`` wide) in the same layout, or (carry, outputs) with ``return_carry``."""
        spec = self.spec
        time_major = self.time_major if time_major is None else time_major
        params, x, h0, lengths, batch_dims = self._arguments(inputs, initial_carry, seq_lengths, time_major)
        states, last = rnn_states(params, spec, x, h0=h0, lengths=lengths, return_last=True, **self._options())
        outputs = _batch_layout(states, batch_dims, time_major)
        if not return_carry:
            return outputs
        shape = lambda a: a.reshape(*batch_dims, -1)  # noqa: E731
        carry = tuple((shape(e[1]), shape(e[0])) if spec.is_lstm else shape(e) for e in last)
        return carry, outputs

    def _arguments(self, inputs, initial_carry, seq_lengths, time_major: bool):
        """(params, xs [T, B, N], h0 or None, lengths, the batch dimensions): ``rnn_states``' arguments."""
        spec = self.spec
        x, batch_dims, lengths = _time_major(_cast(inputs, self.dtype), spec.input_size, time_major, seq_lengths)
        b = x.shape[1]
        h0 = None
        if initial_carry is not None:
            entries = len(spec.state_sizes())
            if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != entries:
                raise ValueError(f"initial_carry: expected a tuple of {entries} entries (one per layer and direction)")
            flat = lambda a: jnp.asarray(a).reshape(b, -1)  # noqa: E731
            h0 = tuple((flat(e[1]), flat(e[0])) if spec.is_lstm else flat(e) for e in _cast(initial_carry, self.dtype))
        readout = ReadoutParams(jnp.zeros((self.out_features, 1), x.dtype), jnp.zeros((1,), x.dtype))
        params = RNNParams(
            tuple(w.params() for w in self.layers), tuple(w.params() for w in self.reverse_layers), readout
        )
        return _cast(params, self.dtype), x, h0, lengths, batch_dims

    def _options(self) -> dict:
        return _layer_options(self)

    def tune(self, inputs: Array, *, initial_carry=None, seq_lengths=None, time_major=None, **tune_options):
        """As ``RNN.tune``: the whole stack's plan for inputs of this shape, measured and cached."""
        time_major = self.time_major if time_major is None else time_major
        params, x, h0, lengths, _ = self._arguments(inputs, initial_carry, seq_lengths, time_major)
        return _tune(params, self.spec, x, h0, lengths, self._options(), tune_options)


def _layer_options(layer) -> dict:
    """A layer's keywords of ``rnn_states``."""
    names = ("unroll", "recurrence", "grad", "gates", "max_memory", "checkpoint_every")
    return {name: getattr(layer, name) for name in names}


def _tune(params, spec, x, h0, lengths, options: dict, tune_options: dict):
    """``bptt_jax.tune_states`` for a layer's call (its ``grad`` must be "bptt": autodiff has no plan)."""
    options = dict(options)
    if options.pop("grad") != "bptt":
        raise ValueError("tune: this layer's grad is 'autodiff' (jax.grad of the scans), which has no plan to tune")
    return tune_states(params, spec, x, h0=h0, lengths=lengths, **options, **tune_options)


def _time_major(inputs, n_in: int, time_major: bool, seq_lengths):
    """``nnx.RNN``'s layouts -> (xs [T, B, N] with B the product of the batch dimensions, the batch
    dimensions, lengths [B] or None), with named errors for a wrong width or ``seq_lengths`` shape."""
    inputs = jnp.asarray(inputs)
    if inputs.ndim < 2 or inputs.shape[-1] != n_in:
        raise ValueError(
            f"inputs: expected [*batch, T, {n_in}] (time_major: [T, *batch, {n_in}]), got shape {inputs.shape}"
        )
    x = inputs if time_major else jnp.moveaxis(inputs, -2, 0)  # [T, *batch, N]
    t_len, batch_dims = x.shape[0], x.shape[1:-1]
    b = math.prod(batch_dims)
    lengths = None
    if seq_lengths is not None:
        if np.shape(seq_lengths) != batch_dims:
            raise ValueError(
                f"seq_lengths: expected shape {batch_dims} (the batch dimensions), got {np.shape(seq_lengths)}"
            )
        checks.check_layer_lengths("seq_lengths", seq_lengths, t_len)
        lengths = jnp.asarray(seq_lengths).reshape(b).astype(jnp.int32)
    return x.reshape(t_len, b, n_in), batch_dims, lengths


def _batch_layout(states, batch_dims, time_major: bool):
    """[T, B, F] -> the caller's layout: [*batch, T, F], or [T, *batch, F] when time-major."""
    out = states.reshape(states.shape[0], *batch_dims, states.shape[-1])
    return out if time_major else jnp.moveaxis(out, 0, -2)


def _cast(tree, dtype):
    """Every array of ``tree`` in ``dtype`` (None: unchanged). A cast of the weights is differentiable:
    their gradients come back in their own dtype."""
    if dtype is None or tree is None:
        return tree
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(dtype), tree)


def _set(linear: Any, **arrays) -> None:
    """Writes arrays into a Flax Linear's Params (``kernel=...``, ``bias=...``)."""
    for attr, value in arrays.items():
        getattr(linear, attr)[...] = value


def _activation_name(fn) -> str | None:
    for name, f in _ACTIVATIONS.items():
        if fn is f or fn is getattr(nnx, name, None) or fn is getattr(jax.nn, name, None):
            return name
    return None
