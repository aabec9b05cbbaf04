"""Test-only oracles: plain Python loops over time and helpers to draw random problems.

Library code never loops over time in Python; these loops exist so the scans have something to be
compared with.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from bptt_jax.core import activations
from bptt_jax.core.cells import elman as cell
from bptt_jax.core.params import GRUParams, LSTMParams, RNNParams, RNNSpec, expected_shapes

ACTIVATIONS = ("tanh", "relu", "sigmoid", "identity")
VALID_PAIRS = (
    ("softmax", "cross_entropy"),
    ("softmax", "squared_error"),
    ("tanh", "squared_error"),
    ("sigmoid", "squared_error"),
    ("identity", "squared_error"),
    ("sigmoid", "binary_cross_entropy"),
)


def gru_step(p, h, x):
    """One GRU step as PyTorch's nn.GRU documents it (gates r, z, n; b_hn inside r * (...)), written
    here from those equations, independently of bptt_jax.core.cells.gru. h: [B, N1], x: [B, N]."""
    n1 = h.shape[-1]
    w_i = lambda k: p.wx[:, k * n1 : (k + 1) * n1]
    w_h = lambda k: p.wh[:, k * n1 : (k + 1) * n1]
    b_i = lambda k: p.bx[k * n1 : (k + 1) * n1]
    b_h = lambda k: p.bh[k * n1 : (k + 1) * n1]
    r = jax.nn.sigmoid(x @ w_i(0) + b_i(0) + h @ w_h(0) + b_h(0))
    z = jax.nn.sigmoid(x @ w_i(1) + b_i(1) + h @ w_h(1) + b_h(1))
    n = jnp.tanh(x @ w_i(2) + b_i(2) + r * (h @ w_h(2) + b_h(2)))
    return (1 - z) * n + z * h


def lstm_step(p, state, x):
    """One LSTM step as PyTorch's nn.LSTM documents it (gates i, f, g, o), independently of
    bptt_jax.core.cells.lstm. state: (h, c), each [B, N1]; x: [B, N]. Returns (h, c)."""
    h, c = state
    n1 = h.shape[-1]
    pre = lambda k: (
        (x @ p.wx[:, k * n1 : (k + 1) * n1] + p.bx[k * n1 : (k + 1) * n1] + h @ p.wh[:, k * n1 : (k + 1) * n1])
        + p.bh[k * n1 : (k + 1) * n1]
    )
    i, f, g, o = jax.nn.sigmoid(pre(0)), jax.nn.sigmoid(pre(1)), jnp.tanh(pre(2)), jax.nn.sigmoid(pre(3))
    c = f * c + i * g
    return o * jnp.tanh(c), c


def _step(layer, activation, state, x):
    if isinstance(layer, LSTMParams):
        return lstm_step(layer, state, x)
    if isinstance(layer, GRUParams):
        return gru_step(layer, state, x)
    return cell.step(layer, activation, state, x)


def loop_layer(layer, activation, xs, h0, lengths=None):
    """h(t) for t = 0..T-1 by a Python loop over the cell's step (cell.step for Elman, the PyTorch
    equations above for GRU and LSTM); padding (t >= length) holds the state. h0 is the public state
    (an (h, c) pair for the LSTM); returns the h(t) [T, B, N1]."""
    state = h0
    hs = []
    for t in range(xs.shape[0]):
        new = _step(layer, activation, state, xs[t])
        if lengths is not None:
            keep = (t < lengths)[:, None]
            new = jax.tree_util.tree_map(lambda a, b, keep=keep: jnp.where(keep, a, b), new, state)
        state = new
        hs.append(state[0] if isinstance(layer, LSTMParams) else state)
    return jnp.stack(hs)


def loop_forward(params, spec, xs, h0, lengths=None):
    """The whole network by Python loops, each sequence's reverse net run on its own flipped prefix."""
    t_len, batch, _ = xs.shape
    d = spec.num_directions
    inputs = xs
    all_hs = []
    for k in range(spec.num_layers):
        hs_f = loop_layer(params.layers[k], spec.activation, inputs, h0[k * d], lengths)
        all_hs.append(hs_f)
        merged = hs_f
        if spec.bidirectional:
            cols = []
            for b in range(batch):  # reverse each sequence's valid prefix by hand
                n = t_len if lengths is None else int(lengths[b])
                seq = inputs[:, b : b + 1]
                rev_in = jnp.concatenate([seq[:n][::-1], seq[n:]], axis=0)
                hr = loop_layer(
                    params.reverse_layers[k],
                    spec.activation,
                    rev_in,
                    jax.tree_util.tree_map(lambda a, b=b: a[b : b + 1], h0[k * d + 1]),
                    None if lengths is None else jnp.array([n]),
                )
                cols.append(jnp.concatenate([hr[:n][::-1], hr[n:]], axis=0))
            hs_r = jnp.concatenate(cols, axis=1)
            all_hs.append(hs_r)
            merged = jnp.concatenate([hs_f, hs_r], -1) if spec.merge == "concat" else hs_f + hs_r
        inputs = merged
    z2s = inputs @ params.readout.w2 + params.readout.b2
    return activations.output(spec.output_activation, z2s), all_hs


# Block sizes for the blocked BPTT, by kind (resolved against T by ``block_size``).
BLOCKS = st.sampled_from(("1", "T", "nondivisor", "auto"))


def block_size(kind, t_len: int):
    """C for a kind from BLOCKS: 1, T, one that does not divide T (T+1 if every C < T divides it:
    it is then capped at T), or None (automatic)."""
    if kind is None or kind == "auto":
        return None
    if kind == "1":
        return 1
    if kind == "T":
        return t_len
    return next((c for c in range(2, t_len) if t_len % c), t_len + 1)


@dataclasses.dataclass
class Problem:
    spec: RNNSpec
    params: object
    xs: jax.Array
    targets: jax.Array
    weights: object
    lengths: object
    h0: tuple


@st.composite
def problems(draw, *, bidirectional=None, max_t=6, max_layers=3, lengths=None, cells=("elman",)):
    """A random network and batch: the cell (one of ``cells``), sizes, activations, (output
    activation, divergence), weights, targets, loss weights, lengths (including 0 and T) and initial
    states."""
    t_len = draw(st.integers(1, max_t))
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    n_layers = draw(st.integers(1, max_layers))
    hidden = tuple(draw(st.integers(1, 5)) for _ in range(n_layers))
    m = draw(st.integers(1, 4))
    act = draw(st.sampled_from(ACTIVATIONS))
    out_act, div = draw(st.sampled_from(VALID_PAIRS))
    bidir = draw(st.booleans()) if bidirectional is None else bidirectional
    merge = draw(st.sampled_from(("concat", "sum")))
    use_lengths = draw(st.booleans()) if lengths is None else lengths
    use_weights = draw(st.booleans())
    use_h0 = draw(st.booleans())
    int_targets = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    cell_name = draw(st.sampled_from(cells))
    spec = RNNSpec(
        n,
        hidden,
        m,
        activation=act if cell_name == "elman" else "tanh",
        output_activation=out_act,
        divergence=div,
        bidirectional=bidir,
        merge=merge,
        cell=cell_name,
    )
    return make_problem(spec, t_len, batch, seed, use_lengths, use_weights, use_h0, int_targets)


def on_device(a, dtype=None) -> jax.Array:
    """``a`` (array-like) as a jax array of ``dtype`` (None: numpy's, canonicalized as jnp.asarray
    does), cast by numpy and put on the device as it is: with this jax, ``jnp.asarray`` of a numpy
    array compiles a small XLA program for every new shape (a copy, or a ``convert_element_type``
    where the dtype changes; about 100 such compiles in a 10-example property test),
    ``jax.device_put`` none."""
    a = np.asarray(a)
    return jax.device_put(a if dtype is None else a.astype(jnp.dtype(dtype)))


def _scaled_params(seed: int, spec: RNNSpec, dtype):
    """Random parameters for ``spec``: every array U(-b, b) times 1.5, b = 1/sqrt(fan) as in
    ``init_params``' "uniform" scheme (b = 1/sqrt(N1) for a layer, 1/sqrt(its input) for the readout),
    scaled up so the recurrence matters while values stay moderate. Drawn with numpy: run eagerly,
    ``init_params``' small random ops compile again for the new shapes of every hypothesis example
    (measured: 0.5 s of a property test's ~1.8 s per example; jitted whole, 1 s per spec)."""
    rng = np.random.RandomState([seed, 1])
    draw = lambda b, shape: on_device(rng.uniform(-b, b, shape) * 1.5, dtype)
    shapes = expected_shapes(spec)
    layer = lambda shp: type(shp)(*(draw(1.0 / np.sqrt(shp[1][0]), s) for s in shp))  # shp[1]: [N1, G N1]
    ro = shapes.readout
    b_ro = 1.0 / np.sqrt(ro.w2[0])
    return RNNParams(
        tuple(layer(s) for s in shapes.layers),
        tuple(layer(s) for s in shapes.reverse_layers),
        type(ro)(draw(b_ro, ro.w2), draw(b_ro, ro.b2)),
    )


def make_problem(
    spec, t_len, batch, seed, use_lengths=False, use_weights=False, use_h0=False, int_targets=True, dtype=jnp.float32
):
    rng = np.random.RandomState(seed)
    params = _scaled_params(seed, spec, dtype)
    xs = on_device(rng.randn(t_len, batch, spec.input_size), dtype)
    m = spec.output_size
    if spec.divergence == "cross_entropy" and int_targets:
        targets = on_device(rng.randint(0, m, size=(t_len, batch)), jnp.int32)
    elif spec.divergence == "cross_entropy":
        p = rng.rand(t_len, batch, m) + 0.1
        targets = on_device(p / p.sum(-1, keepdims=True), dtype)
    elif spec.divergence == "binary_cross_entropy":
        targets = on_device(rng.rand(t_len, batch, m), dtype)
    else:
        targets = on_device(rng.randn(t_len, batch, m) * 0.5, dtype)
    weights = on_device(rng.rand(t_len, batch), dtype) if use_weights else None
    lengths = None
    if use_lengths:
        lens = rng.randint(0, t_len + 1, size=batch)
        lens[rng.randint(batch)] = t_len  # at least one full-length sequence
        lengths = on_device(lens, jnp.int32)
    h0 = None
    if use_h0:
        draw_h = lambda n1: on_device(rng.randn(batch, n1) * 0.5, dtype)
        if spec.cell == "lstm":  # (h, c) pairs
            h0 = tuple((draw_h(n1), draw_h(n1)) for n1 in spec.state_sizes())
        else:
            h0 = tuple(draw_h(n1) for n1 in spec.state_sizes())
    return Problem(spec, params, xs, targets, weights, lengths, h0)


def zero_h0(spec, batch: int, dtype) -> tuple:
    """Zero initial states as the public calls take them: [B, N1] arrays, (h, c) pairs for the LSTM."""
    z = lambda n1: on_device(np.zeros((batch, n1)), dtype)
    return tuple((z(n1), z(n1)) if spec.cell == "lstm" else z(n1) for n1 in spec.state_sizes())


def cast(problem: Problem, dtype) -> Problem:
    """The same problem with every float array cast to dtype (through numpy: no XLA program to
    compile for each new shape)."""
    f = lambda a: on_device(a, dtype) if (a is not None and jnp.issubdtype(a.dtype, jnp.floating)) else a
    return Problem(
        problem.spec,
        jax.tree_util.tree_map(f, problem.params),
        f(problem.xs),
        f(problem.targets),
        f(problem.weights),
        problem.lengths,
        None if problem.h0 is None else jax.tree_util.tree_map(f, problem.h0),
    )


def max_rel_err(a, b) -> float:
    """Largest over leaves of max|a - b| / max|b| (exact zeros must match exactly)."""
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        diff = np.max(np.abs(x - y)) if x.size else 0.0
        scale = np.max(np.abs(y)) if y.size else 0.0
        if scale == 0.0:
            err = 0.0 if diff == 0.0 else np.inf
        else:
            err = diff / scale
        worst = max(worst, float(err))
    return worst


def float32_error(got32, want32, truth64, tol: float = 1e-5) -> float:
    """How far a float32 result is from its float32 oracle, judged against the float64 truth.

    Returns max_rel_err(got32, want32) when that is below ``tol``. Otherwise both float32 results
    are measured against ``truth64`` (the same computation in float64 from the same inputs): on
    ill-conditioned examples (cancellation, gradients of ~1e-3 from terms of ~1) neither float32
    path reaches ``tol``, and the honest requirement is that the explicit BPTT is as accurate as
    autodiff. Returns the BPTT's error against the truth divided by max(tol, 2 x autodiff's error)
    and scaled by ``tol``, so ``< tol`` means "within twice autodiff's own float32 error".
    """
    err = max_rel_err(got32, want32)
    if err < tol:
        return err
    bound = max(tol, 2.0 * max_rel_err(want32, truth64))
    return max_rel_err(got32, truth64) / bound * tol
