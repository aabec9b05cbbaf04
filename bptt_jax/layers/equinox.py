"""An Equinox recurrent layer (Elman, GRU, LSTM) whose backward pass is the explicit BPTT::

    from bptt_jax.layers import equinox as beqx
    rnn = beqx.RNN(16, 32, cell="gru", key=jax.random.key(0))
    hs = rnn(xs)                                   # one sequence: xs [T, N] -> hs [T, N1]
    hs = jax.vmap(rnn)(xs_batch)                   # a batch, the Equinox way
    hs = rnn(xs_batch)                             # the same, one call: xs [B, T, N]
    hs, h_last = rnn(xs, length=5, return_last=True)
    rnn = beqx.RNN.from_eqx_cell(eqx.nn.LSTMCell(16, 32, key=key))   # the same weights

Equinox's conventions: one sequence per call (batch with ``jax.vmap``), the network's description
(``spec``) a static field, the weights an ordinary pytree field (``layer``: the cell's
``LayerParams`` / ``GRUParams`` / ``LSTMParams``; a bias the layout ``biases`` does not train is
None there, and the "equinox" GRU's b_hn is ``bias_n``), so ``eqx.filter_value_and_grad``,
``eqx.tree_serialise_leaves`` and optax work unchanged. Gradients run the explicit BPTT: a batch
call ``bptt_jax.core.vjp.rnn_states``' custom VJP; a vmapped one-sequence call under ``jax.grad``
(training: ``jax.vmap`` the innermost transformation) the batch call over the vmapped batch, where
its rules run the compiled kernel (a ``custom_vmap`` rule); any other one-sequence call (each of a
vmapped batch, e.g. under ``jax.vmap`` of ``jax.grad``) ``bptt_jax.core.sequence.layer_states``,
whose custom VJP covers the reverse recurrence alone so that ``jax.vmap`` batches the
weight-gradient matmuls around it (its loops the compiled kernel's where the batch call's rules
run it: one kernel call for the whole vmapped batch). Equinox ships no vanilla RNN cell: the Elman
layer here has no Equinox counterpart.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from bptt_jax.core import cells, checks, forward, kernels, sequence, vjp
from bptt_jax.core.params import ReadoutParams, RNNParams, RNNSpec, init_params
from bptt_jax.core.tune import tune_states
from bptt_jax.core.vjp import rnn_states
from bptt_jax.layers import biases as bias_layouts

Array = jax.Array


class RNN(eqx.Module):
    """One recurrent layer over one sequence; ``jax.vmap`` it over a batch.

    Args:
      in_size: N, the input width.
      hidden_size: N1, the state width.
      cell: "elman", "gru" or "lstm".
      activation: the Elman cell's f1 (as ``RNNSpec``); gated cells use tanh.
      unroll: scan steps per loop iteration; None picks by backend (1 on a CPU, 8 on a GPU).
      recurrence: "auto", "scan", "pallas" or "native", as ``bptt_jax.bptt`` ("native": the
        cells' compiled CPU kernel, float32; "auto" runs it for the gated cells on the CPU, in a
        one-sequence call too, where ``jax.vmap`` runs one kernel call for the whole batch).
      grad: "bptt" (the explicit BPTT) or "autodiff" (``jax.grad`` differentiates the forward scan:
        the same layer as an oracle).
      init, init_scale, forget_bias, dtype: the initialisation, as ``bptt_jax.init_params``.
      compute_dtype: the explicit BPTT's mixed precision, as ``RNNSpec.compute_dtype`` (None,
        "bfloat16", "float16" or "float32"; docs/howto/precision.md): the weights and the final
        state stay in ``dtype``, the states h(t) come in the compute dtype.
      biases: which biases are trained: "pytorch" (bx and bh), "equinox" (``eqx.nn.GRUCell``'s bias
        and bias_n, ``eqx.nn.LSTMCell``'s bias: what ``from_eqx_cell`` gives), "flax" or "none"
        (``bptt_jax.layers.biases``); the others are zeros, not leaves.
      gates, max_memory: the gated cells' gates stored or recomputed, and a budget for the temp
        memory of one call's forward + backward, as ``bptt_jax.core.vjp.rnn_states`` (under
        ``jax.vmap`` that is one sequence's program, which vmap then runs for the whole batch;
        the batch call [B, T, N] is budgeted whole).
      checkpoint_every: k, checkpoint segments of the backward pass, as ``rnn_states`` (a k that
        does not divide the sequence length fills the last segment up with held steps; a tuple
        (k1, k2, ...) nests them); None: none.
      key: a JAX PRNG key for the weights.
    """

    layer: tuple  # the cell's parameter NamedTuple (LayerParams, GRUParams or LSTMParams); None: not trained
    bias_n: Array | None  # the "equinox" GRU's b_hn [N1] (eqx.nn.GRUCell's bias_n); None otherwise
    spec: RNNSpec = eqx.field(static=True)
    biases: str = eqx.field(static=True)
    unroll: int | None = eqx.field(static=True)
    recurrence: str = eqx.field(static=True)
    grad: str = eqx.field(static=True)
    gates: str = eqx.field(static=True)
    max_memory: int | str | None = eqx.field(static=True)
    checkpoint_every: int | tuple[int, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        *,
        cell: str = "elman",
        activation: str = "tanh",
        unroll: int | None = None,
        recurrence: str = "auto",
        grad: str = "bptt",
        init: str = "uniform",
        init_scale: float = 1.0,
        forget_bias: float = 0.0,
        dtype=jnp.float32,
        compute_dtype=None,
        biases: str = "pytorch",
        gates: str = "auto",
        max_memory: int | str | None = None,
        checkpoint_every: int | tuple[int, ...] | None = None,
        key: Array,
    ):
        vjp.check_grad(grad)
        bias_layouts.check_layout(biases)
        self.spec = RNNSpec(in_size, (hidden_size,), 1, activation=activation, cell=cell, compute_dtype=compute_dtype)
        self.gates, self.max_memory, self.checkpoint_every = vjp.check_memory_options(
            gates, max_memory, checkpoint_every
        )
        self.unroll, self.grad, self.biases = unroll, grad, biases
        self.recurrence = kernels.check_recurrence(recurrence)
        full = init_params(key, self.spec, scheme=init, scale=init_scale, dtype=dtype, forget_bias=forget_bias)
        self.layer, self.bias_n = _stored(cell, biases, full.layers[0])

    def full_layer(self):
        """The cell's full parameters (zeros for the biases the layout does not train)."""
        arrays = {k: v for k, v in self.layer._asdict().items() if v is not None}
        if self.bias_n is not None:
            arrays["bh_n"] = self.bias_n
        return bias_layouts.join(self.spec.cell, self.biases, arrays)

    def __call__(self, xs: Array, h0=None, *, length=None, return_last: bool = False, key=None):
        """xs [T, N] -> the states h(t) [T, N1]; with ``return_last`` also the final state (h [N1],
        or (h, c) for the LSTM), the state at the last valid step when ``length`` (a scalar, steps
        past it hold the state; an integer, in [0, T] where it is a Python or NumPy value: a named
        error otherwise, device arrays are not read back) is given. ``h0``: [N1] (LSTM: (h, c)),
        zeros when None. ``key`` is accepted for Equinox's layer signature and not used.

        A batch in one call: xs [B, T, N] (``length`` [B], ``h0`` [B, N1]) -> [B, T, N1], the same
        values as ``jax.vmap`` over the sequences. One call sums the weight gradients inside its
        blocked reverse scan; a vmapped one-sequence call under ``jax.grad`` (``jax.vmap`` the
        innermost transformation) runs exactly that batch call where the compiled kernel runs
        (``_one_call_for_vmap``), and elsewhere (e.g. ``jax.vmap`` of ``jax.grad``) hands dA(t) and
        dV(t) of the whole sequence to matmuls outside its custom VJP (``core.sequence``, whose
        loops run the compiled kernel where the batch call's rules would, one call for the whole
        vmapped batch; benchmarks/results/eqx_speed_s20_spr.md). A one-sequence call with
        ``gates="recompute"``, ``checkpoint_every``, ``max_memory``, a compute dtype or the Pallas
        kernels runs ``rnn_states`` instead (its weight gradients per sequence under ``jax.vmap``),
        with the scans where ``recurrence`` is "auto" (``jax.vmap`` would run an FFI call once per
        sequence)."""
        if jnp.ndim(xs) == 2 and self._one_call_for_vmap(xs):  # jax.grad of a vmapped call: one batch call
            return _vmapped_as_batch(self, return_last)(eqx.partition(self, eqx.is_array)[0], xs, h0, length)
        return self._call(xs, h0, length, return_last)

    def _call(self, xs, h0, length, return_last: bool):
        params, x, h0, lengths, batch = self._arguments(xs, h0, length)
        n1 = self.spec.hidden_sizes[0]
        if not batch and self._per_sequence():  # one sequence (under jax.vmap: each of a batch)
            x, h0_in, lengths = checks.check_inputs(params, self.spec, x, h0, lengths)
            valid = forward.valid_mask(lengths, x.shape[0])
            unroll = forward.resolve_unroll(self.unroll)
            states, s_last = sequence.layer_states(
                params.layers[0], self.spec.activation, x, h0_in[0], valid, unroll=unroll, native=self._native(x.dtype)
            )
            last = self.spec.public_states((s_last,))
        else:  # "auto" on one sequence: the scans (under jax.vmap an FFI call would run once per sequence)
            recurrence = "scan" if not batch and self.recurrence == "auto" else self.recurrence
            states, last = self._batch_call(params, x, h0, lengths, recurrence)
        hs = jnp.moveaxis(states, 1, 0).reshape(*batch, -1, n1)  # [*batch, T, N1]
        if not return_last:
            return hs
        unbatch = lambda a: a.reshape(*batch, n1)  # noqa: E731
        final = tuple(unbatch(a) for a in last[0]) if self.spec.is_lstm else unbatch(last[0])
        return hs, final

    def _one_call_for_vmap(self, xs) -> bool:
        """Whether a one-sequence call runs as the batch call over the vmapped batch: where
        ``jax.vmap`` is the innermost transformation and batches ``xs`` (``jax.grad`` of a vmapped
        loss, as in training; ``core.sequence._vmap_innermost``) and a one-sequence call would run
        the compiled kernel. ``jax.grad`` then differentiates the batch call (its custom VJP sums
        the weight gradients inside the kernel); where ``jax.grad`` is inside the vmap (per-example
        gradients) the one-sequence call runs as it is."""
        return self._per_sequence() and self._native(jnp.result_type(xs)) and sequence._vmap_innermost(xs)

    def _per_sequence(self) -> bool:
        """Whether a one-sequence call runs ``core.sequence.layer_states`` (whose weight gradients
        jax.vmap batches into whole-batch matmuls) rather than ``rnn_states``: the explicit BPTT
        with the gates kept ("auto" or "store"), the scans or the compiled kernel, no segments, no
        budget, no compute dtype."""
        return (
            self.grad == "bptt"
            and self.recurrence in ("auto", "scan", "native")
            and self.gates != "recompute"
            and self.checkpoint_every is None
            and self.max_memory is None
            and self.spec.compute_dtype is None
        )

    def _native(self, dtype) -> bool:
        """Whether a one-sequence call's loops run the compiled kernel: ``recurrence`` "native", or
        "auto" where the batch call's rules would run it (``kernels.resolve``)."""
        if self.recurrence == "scan":
            return False
        return kernels.resolve(self.recurrence, self.spec.hidden_sizes, dtype, cell=self.spec.cell) == "native"

    def _batch_call(self, params, x, h0, lengths, recurrence):
        return rnn_states(
            params,
            self.spec,
            x,
            h0=h0,
            lengths=lengths,
            unroll=self.unroll,
            recurrence=recurrence,
            return_last=True,
            grad=self.grad,
            gates=self.gates,
            max_memory=self.max_memory,
            checkpoint_every=self.checkpoint_every,
        )

    def tune(self, xs: Array, h0=None, *, length=None, **tune_options):
        """Measures this layer's explicit BPTT plans for ``xs`` of this shape on this machine and
        caches the fastest (``bptt_jax.tune_states``; ``tune_options``: its ``time_budget``,
        ``rounds``, ``progress``, ``record``); later calls of the same shape read it when they are
        traced. Tune the batch [B, T, N]: the batch call reads the plan, and so does a vmapped
        call under ``jax.grad`` where it runs as that batch call (``_one_call_for_vmap``); a
        one-sequence call [T, N] is another problem. Arguments as ``__call__``; returns the plan."""
        if self.grad != "bptt":
            raise ValueError("tune: this layer's grad is 'autodiff' (jax.grad of the scan), which has no plan to tune")
        params, x, h0, lengths, _ = self._arguments(xs, h0, length)
        return tune_states(
            params,
            self.spec,
            x,
            h0=h0,
            lengths=lengths,
            unroll=self.unroll,
            recurrence=self.recurrence,
            gates=self.gates,
            max_memory=self.max_memory,
            checkpoint_every=self.checkpoint_every,
            **tune_options,
        )

    def _arguments(self, xs, h0, length):
        """(params, xs [T, B, N], h0, lengths, the batch dimensions () or (B,)): ``rnn_states``' arguments."""
        xs = jnp.asarray(xs)
        n1 = self.spec.hidden_sizes[0]
        if xs.ndim not in (2, 3) or xs.shape[-1] != self.spec.input_size:
            raise ValueError(
                f"xs: expected one sequence [T, {self.spec.input_size}] or a batch [B, T, {self.spec.input_size}], "
                f"got shape {xs.shape}"
            )
        if 0 in xs.shape[:-1]:
            raise ValueError(f"xs: expected T >= 1 steps (and B >= 1 sequences), got shape {xs.shape}")
        batch = xs.shape[:-2]  # () or (B,)
        x = jnp.moveaxis(xs.reshape((-1,) + xs.shape[-2:]), 0, 1)  # [T, B, N]
        if h0 is not None:
            parts = h0 if self.spec.is_lstm else (h0,)
            if self.spec.is_lstm and not (isinstance(h0, (tuple, list)) and len(h0) == 2):
                raise ValueError("h0: the LSTM's state is a pair (h, c)")
            for p in parts:
                if jnp.shape(p) != (*batch, n1):
                    raise ValueError(f"h0: expected shape {(*batch, n1)} per array, got {jnp.shape(p)}")
            batched = tuple(jnp.asarray(p).reshape(-1, n1) for p in parts)
            h0 = (batched,) if self.spec.is_lstm else batched
        lengths = None
        if length is not None:
            if np.shape(length) != batch:
                raise ValueError(f"length: expected shape {batch} (one per sequence), got {np.shape(length)}")
            checks.check_layer_lengths("length", length, x.shape[0])
            lengths = jnp.asarray(length).reshape(-1).astype(jnp.int32)
        readout = ReadoutParams(jnp.zeros((n1, 1), x.dtype), jnp.zeros((1,), x.dtype))  # unused: not a field
        return RNNParams((self.full_layer(),), (), readout), x, h0, lengths, batch

    @classmethod
    def from_eqx_cell(cls, cell, **kwargs) -> RNN:
        """A layer with the weights of ``eqx.nn.GRUCell`` or ``eqx.nn.LSTMCell`` (PyTorch's gate
        orders; the GRU's ``bias_n`` is b_hn). Its trained arrays are exactly the cell's
        (``biases="equinox"``), so it trains as the cell scanned does. Keyword options as ``RNN``."""
        name = type(cell).__name__
        kinds = {"GRUCell": "gru", "LSTMCell": "lstm"}
        if name not in kinds:
            raise ValueError(f"from_eqx_cell: expected eqx.nn.GRUCell or eqx.nn.LSTMCell, got {name}")
        g = 3 if name == "GRUCell" else 4
        n1 = cell.hidden_size
        kwargs.setdefault("biases", "equinox")
        if not cell.use_bias:
            kwargs["biases"] = "none"  # the cell has no biases: nor does the layer
        layer = cls(cell.input_size, n1, cell=kinds[name], key=jax.random.key(0), **kwargs)
        dtype = cell.weight_ih.dtype
        zeros = jnp.zeros((g * n1,), dtype)
        bx = cell.bias if cell.use_bias else zeros
        bh = zeros
        if name == "GRUCell" and cell.use_bias:
            bh = zeros.at[2 * n1 :].set(cell.bias_n)
        params = cells.get(kinds[name]).Params(cell.weight_ih.T, cell.weight_hh.T, bx, bh)
        stored, bias_n = _stored(kinds[name], layer.biases, params)
        layer = eqx.tree_at(lambda m: m.layer, layer, stored)
        return eqx.tree_at(lambda m: m.bias_n, layer, bias_n, is_leaf=lambda x: x is None)


def _stored(cell: str, layout: str, full):
    """(the NamedTuple with None for the biases ``layout`` does not train, b_hn or None)."""
    arrays = bias_layouts.split(cell, layout, full)
    return type(full)(*(arrays.get(f) for f in full._fields)), arrays.get("bh_n")


def _vmapped_as_batch(layer: RNN, return_last: bool):
    """f(the layer's arrays, xs [T, N], h0, length) -> ``layer(xs, h0, length=length,
    return_last=return_last)``, whose ``jax.vmap`` rule is the layer's batch call [B, T, N] (the
    static part of the layer is this one's; weights vmapped too: each element's call as it is)."""
    static = eqx.partition(layer, eqx.is_array)[1]

    def one(arrays, xs, h0, length):
        return eqx.combine(arrays, static)._call(xs, h0, length, return_last)

    f = custom_batching.custom_vmap(one)

    @f.def_vmap
    def rule(size, in_batched, arrays, xs, h0, length):
        arrays_b, xs_b, h0_b, length_b = in_batched
        if any(jax.tree_util.tree_leaves(arrays_b)) or not xs_b:
            axes = jax.tree_util.tree_map(lambda b: 0 if b else None, list(in_batched))
            out = jax.vmap(one, in_axes=tuple(axes))(arrays, xs, h0, length)
            return out, jax.tree_util.tree_map(lambda _: True, out)
        spread = lambda a, b: a if b else jnp.broadcast_to(a, (size, *jnp.shape(a)))  # noqa: E731
        h0 = None if h0 is None else jax.tree_util.tree_map(spread, h0, h0_b)
        length = None if length is None else spread(length, length_b)
        out = eqx.combine(arrays, static)._call(xs, h0, length, return_last)  # the batch call [B, T, N]
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return f
