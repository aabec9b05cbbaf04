"""bptt_jax.layers.nnx.RNN against Flax NNX's own nnx.RNN with the corresponding cell (forward, final
carries, gradients; float64), inside nnx.Bidirectional, trained with nnx.Optimizer, split/merged."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

nnx = pytest.importorskip("flax.nnx")

from bptt_jax.layers import biases as bias_layouts  # noqa: E402
from bptt_jax.layers import nnx as bnnx  # noqa: E402
from tests import reference as ref  # noqa: E402

T, N, N1 = 6, 3, 4
FLAX_CELLS = {
    "SimpleCell": "elman",
    "GRUCell": "gru",
    "OptimizedLSTMCell": "lstm",
    "LSTMCell": "lstm",
}
# What each Flax cell's parameters map onto (the rest of ours has no Flax counterpart: the GRU's
# recurrent biases, the LSTM's input-side bias, whose gradient equals the recurrent one's).
COMPARED = {"SimpleCell": ("w1", "w11", "b1"), "GRUCell": ("wx", "wh", "bx"), "OptimizedLSTMCell": ("wx", "wh", "bh")}
COMPARED["LSTMCell"] = COMPARED["OptimizedLSTMCell"]


def _flax_cell(name, dtype=jnp.float64, seed=1):
    return getattr(nnx, name)(N, N1, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(seed))


def _valid(lengths, t_len):
    return (jnp.arange(t_len)[None, :] < lengths[:, None])[..., None]


def _loss(carry, ys, valid, seed=0):
    """A loss of every valid output and of the final carry (padding differs on purpose)."""
    rng = np.random.RandomState(seed)
    w = ref.on_device(rng.randn(*ys.shape[-1:]))
    total = jnp.sum(jnp.where(valid[..., 0], jnp.tanh(ys @ w) ** 2, 0.0))
    for k, c in enumerate(jax.tree_util.tree_leaves(carry)):
        total = total + jnp.sum(jnp.sin(c + k))
    return total


@pytest.mark.parametrize("name", list(FLAX_CELLS))
def test_equals_flax_rnn_forward_carry_and_gradients(name):
    with jax.enable_x64(True):
        fc = _flax_cell(name)
        ref = nnx.RNN(fc, return_carry=True)
        ours = bnnx.RNN.from_flax_cell(fc, return_carry=True, param_dtype=jnp.float64)
        assert ours.cell == FLAX_CELLS[name]
        xs = jax.random.normal(jax.random.key(0), (4, T, N), jnp.float64)
        lengths = jnp.array([T, 3, 1, 5])
        valid = _valid(lengths, T)
        (c_ref, y_ref), (c_ours, y_ours) = ref(xs, seq_lengths=lengths), ours(xs, seq_lengths=lengths)
        np.testing.assert_allclose(jnp.where(valid, y_ours, 0), jnp.where(valid, y_ref, 0), atol=1e-12)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12), c_ours, c_ref)

        g_ref = nnx.grad(lambda m: _loss(*m(xs, seq_lengths=lengths), valid))(ref)
        g_ours = nnx.grad(lambda m: _loss(*m(xs, seq_lengths=lengths), valid))(ours)
        # the Flax gradients in our layout: load them into a copy of the cell and map it
        grad_cell = _flax_cell(name)
        nnx.update(grad_cell, g_ref["cell"])
        mapped = bnnx.RNN.from_flax_cell(grad_cell, param_dtype=jnp.float64)
        for attr in COMPARED[name]:
            np.testing.assert_allclose(g_ours[attr][...], getattr(mapped, attr)[...], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["SimpleCell", "GRUCell", "OptimizedLSTMCell"])
def test_layouts_reverse_and_round_trip(name):
    fc = _flax_cell(name, jnp.float32)
    ours = bnnx.RNN.from_flax_cell(fc)
    xs = jax.random.normal(jax.random.key(2), (2, 3, T, N))  # two batch dimensions
    for kw in ({}, {"reverse": True}, {"reverse": True, "keep_order": True}):
        want = nnx.RNN(fc, **kw)(xs)
        np.testing.assert_allclose(ours(xs, **kw), want, atol=2e-6)
        tm = jnp.moveaxis(xs, -2, 0)  # time-major [T, 2, 3, N]
        np.testing.assert_allclose(ours(tm, time_major=True, **kw), jnp.moveaxis(want, -2, 0), atol=2e-6)
    # with lengths, reversed: the valid steps agree (Flax flips each sequence's valid prefix, so do we)
    xs1 = xs[0]
    lengths = jnp.array([T, 2, 4])
    for kw in ({"reverse": True}, {"reverse": True, "keep_order": True}):
        c_want, want = nnx.RNN(fc, return_carry=True, **kw)(xs1, seq_lengths=lengths)
        c_got, got = ours(xs1, seq_lengths=lengths, return_carry=True, **kw)
        valid = _valid(lengths, T)
        np.testing.assert_allclose(jnp.where(valid, got, 0), jnp.where(valid, want, 0), atol=2e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), c_got, c_want)
    # and back to the Flax cell: the same function
    np.testing.assert_allclose(nnx.RNN(ours.to_flax_cell())(xs), nnx.RNN(fc)(xs), atol=1e-6)
    # an explicit initial carry, in Flax's layout ((c, h) for the LSTM)
    carry = jax.tree_util.tree_map(lambda a: a + 0.3, nnx.RNN(fc).cell.initialize_carry((2, 3, N), nnx.Rngs(0)))
    np.testing.assert_allclose(ours(xs, initial_carry=carry), nnx.RNN(fc)(xs, initial_carry=carry), atol=2e-6)


def test_inside_nnx_bidirectional():
    with jax.enable_x64(True):
        cells = [_flax_cell("GRUCell", seed=s) for s in (1, 2)]
        ref = nnx.Bidirectional(nnx.RNN(cells[0]), nnx.RNN(cells[1]), rngs=nnx.Rngs(0))
        ours = nnx.Bidirectional(
            *(bnnx.RNN.from_flax_cell(c, param_dtype=jnp.float64) for c in cells), rngs=nnx.Rngs(0)
        )
        xs = jax.random.normal(jax.random.key(3), (3, T, N), jnp.float64)
        lengths = jnp.array([T, 4, 2])
        valid = _valid(lengths, T)
        c_want, want = ref(xs, seq_lengths=lengths, return_carry=True)
        c_got, got = ours(xs, seq_lengths=lengths, return_carry=True)
        np.testing.assert_allclose(jnp.where(valid, got, 0), jnp.where(valid, want, 0), atol=1e-12)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12), c_got, c_want)


def _train(rnn, xs, lengths, optimizer, steps=5):
    """``steps`` optimizer steps under nnx.jit of a loss of the valid outputs and the final carry."""
    valid = _valid(lengths, xs.shape[1])
    opt = nnx.Optimizer(rnn, optimizer, wrt=nnx.Param)

    @nnx.jit
    def step(rnn, opt):
        value, g = nnx.value_and_grad(lambda m: _loss(*m(xs, seq_lengths=lengths, return_carry=True), valid))(rnn)
        opt.update(rnn, g)
        return value

    return np.array([float(step(rnn, opt)) for _ in range(steps)])


@pytest.mark.parametrize("name", list(FLAX_CELLS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_switched_model_trains_as_flax_step_for_step(name, optimizer):
    # from_flax_cell keeps exactly the Flax cell's Params (one bias per gate where the cell has one),
    # so any optax optimizer moves them as it moves nnx.RNN(cell)'s: equal losses and weights.
    opt = optax.sgd(0.1) if optimizer == "sgd" else optax.adam(0.05)
    lengths = jnp.array([T, 3, 1])
    with jax.enable_x64(True):
        xs = jax.random.normal(jax.random.key(7), (3, T, N), jnp.float64)
        ref = nnx.RNN(_flax_cell(name), return_carry=True)
        ours = bnnx.RNN.from_flax_cell(_flax_cell(name), return_carry=True, param_dtype=jnp.float64)
        assert set(nnx.state(ours, nnx.Param)) == set(COMPARED[name])  # no Param Flax lacks
        want, got = _train(ref, xs, lengths, opt), _train(ours, xs, lengths, opt)
        assert want[-1] < want[0]
        np.testing.assert_allclose(got, want, rtol=1e-10)
        trained = bnnx.RNN.from_flax_cell(ref.cell, param_dtype=jnp.float64)  # Flax's weights, our names
        for attr in COMPARED[name]:
            np.testing.assert_allclose(getattr(ours, attr)[...], getattr(trained, attr)[...], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["GRUCell", "OptimizedLSTMCell"])
def test_a_switched_model_trains_as_flax_float32_and_bidirectional(name):
    lengths = jnp.array([T, 4, 2])
    xs = jax.random.normal(jax.random.key(8), (3, T, N))
    fcs = lambda: [_flax_cell(name, jnp.float32, seed=s) for s in (1, 2)]  # noqa: E731
    ref = nnx.Bidirectional(*(nnx.RNN(c) for c in fcs()), rngs=nnx.Rngs(0))
    ours = nnx.Bidirectional(*(bnnx.RNN.from_flax_cell(c) for c in fcs()), rngs=nnx.Rngs(0))
    want, got = _train(ref, xs, lengths, optax.adam(0.05)), _train(ours, xs, lengths, optax.adam(0.05))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for layer_ref, layer_ours in ((ref.forward_rnn, ours.forward_rnn), (ref.backward_rnn, ours.backward_rnn)):
        trained = bnnx.RNN.from_flax_cell(layer_ref.cell)
        for attr in COMPARED[name]:
            np.testing.assert_allclose(
                getattr(layer_ours, attr)[...], getattr(trained, attr)[...], rtol=1e-4, atol=1e-5
            )
    # the PyTorch layout stays available: two biases, another training curve
    pt = bnnx.RNN.from_flax_cell(_flax_cell(name, jnp.float32), biases="pytorch")
    assert {"bx", "bh"} <= set(nnx.state(pt, nnx.Param))


@pytest.mark.parametrize("name", list(FLAX_CELLS))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_reduced_precision_flax_cells_give_what_flax_gives(name, dtype):
    # A float16 / bfloat16 Flax cell (dtype and param_dtype; made in float32 and cast: XLA:CPU has no
    # float16 QR for the orthogonal initialiser) through from_flax_cell: Flax's dtype, Flax's outputs
    # to the dtype's rounding, gradients in the weights' dtype.
    fc = getattr(nnx, name)(N, N1, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    nnx.update(fc, jax.tree_util.tree_map(lambda a: a.astype(dtype), nnx.state(fc, nnx.Param)))
    fc.param_dtype = dtype
    xs = jax.random.normal(jax.random.key(9), (2, T, N)).astype(dtype)
    want = nnx.RNN(fc)(xs)
    ours = bnnx.RNN.from_flax_cell(fc)
    got = ours(xs)
    assert got.dtype == want.dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=4 * eps)
    g = nnx.grad(lambda m: jnp.sum(m(xs).astype(jnp.float32) ** 2))(ours)
    assert {a.dtype for a in jax.tree_util.tree_leaves(g)} == {jnp.dtype(dtype)}


@pytest.mark.parametrize("name", ["GRUCell", "OptimizedLSTMCell"])
def test_bfloat16_computation_with_float32_weights(name):
    # Flax's dtype option: computation in bfloat16, weights (and their gradients) in float32.
    fc = getattr(nnx, name)(N, N1, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    xs = jax.random.normal(jax.random.key(10), (2, T, N))
    carry = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), fc.initialize_carry((2, N), nnx.Rngs(0)))
    want = nnx.RNN(fc)(xs, initial_carry=carry)  # Flax's zero carry is float32: its scan needs bf16 given
    ours = bnnx.RNN.from_flax_cell(fc)
    assert ours.dtype == jnp.bfloat16
    got = ours(xs)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=4 * 2.0**-8)
    g = nnx.grad(lambda m: jnp.sum(m(xs).astype(jnp.float32) ** 2))(ours)
    assert {a.dtype for a in jax.tree_util.tree_leaves(g)} == {jnp.dtype(jnp.float32)}
    back = ours.to_flax_cell()
    assert back.dtype == jnp.bfloat16 and jax.tree_util.tree_leaves(nnx.state(back, nnx.Param))[0].dtype == jnp.float32


class Model(nnx.Module):
    """A small sequence model: an embedding-like projection, our layer, a readout."""

    def __init__(self, cell, grad, rngs):
        self.rnn = bnnx.RNN(N, N1, cell=cell, grad=grad, rngs=rngs)
        self.out = nnx.Linear(N1, 2, rngs=rngs)

    def __call__(self, xs):
        return self.out(self.rnn(xs))


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_training_with_nnx_optimizer_equals_autodiff(cell):
    # Three Adam steps under nnx.jit: the explicit BPTT and autodiff of the forward scan (the same
    # module with grad="autodiff") end at the same weights. The GRU's b_hn starts non-zero.
    xs = jax.random.normal(jax.random.key(4), (5, T, N))
    ds = jax.random.randint(jax.random.key(5), (5, T), 0, 2)
    finals = {}
    for grad in ("bptt", "autodiff"):
        model = Model(cell, grad, nnx.Rngs(0))
        if cell == "gru":
            model.rnn.bh[...] = model.rnn.bh[...].at[2 * N1 :].set(0.5)
        opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            def loss(m):
                return optax.softmax_cross_entropy_with_integer_labels(m(xs), ds).mean()

            value, g = nnx.value_and_grad(loss)(model)
            opt.update(model, g)
            return value

        values = [float(step(model, opt)) for _ in range(3)]
        assert values[-1] < values[0]
        finals[grad] = nnx.state(model, nnx.Param)
    leaves_b = jax.tree_util.tree_leaves(finals["bptt"])
    leaves_a = jax.tree_util.tree_leaves(finals["autodiff"])
    assert (
        len(leaves_b) == len(leaves_a) == len(bias_layouts.names(cell, "pytorch")) + 2
    )  # one Param per array, no readout
    for a, b in zip(leaves_b, leaves_a):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_bad_bias_layout_is_named():
    with pytest.raises(ValueError, match="biases: expected one of"):
        bnnx.RNN(N, N1, cell="lstm", biases="keras", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="biases: expected one of"):
        bnnx.StackedRNN(N, (N1,), biases="keras", rngs=nnx.Rngs(0))


def test_split_merge_and_errors():
    layer = bnnx.RNN(N, N1, cell="lstm", forget_bias=1.0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    again = nnx.merge(graphdef, state)
    xs = jax.random.normal(jax.random.key(6), (2, T, N))
    np.testing.assert_array_equal(again(xs), layer(xs))
    np.testing.assert_array_equal(layer.bx[...][N1 : 2 * N1] + layer.bh[...][N1 : 2 * N1], np.ones(N1))
    assert layer.initialize_carry((2, N))[0].shape == (2, N1)  # no RNG stream needed
    with pytest.raises(ValueError, match=r"inputs: expected \[\*batch, T, 3\]"):
        layer(jnp.zeros((2, T, N + 1)))
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \(2,\)"):
        layer(xs, seq_lengths=jnp.array([1, 2, 3]))
    for bad in ([1, T + 1], np.array([-1, 2])):  # host values are read: in [0, T]
        with pytest.raises(ValueError, match=rf"seq_lengths: expected values in \[0, T={T}\], got min"):
            layer(xs, seq_lengths=bad)
    with pytest.raises(TypeError, match="seq_lengths: expected an integer dtype, got float"):
        layer(xs, seq_lengths=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"the LSTM's carry is a pair \(c, h\)"):
        layer(xs, initial_carry=jnp.zeros((2, N1)))
    with pytest.raises(ValueError, match="grad: expected 'bptt' or 'autodiff'"):
        bnnx.RNN(N, N1, grad="finite", rngs=nnx.Rngs(0))
    gru = bnnx.RNN(N, N1, cell="gru", rngs=nnx.Rngs(0))
    gru.bh[...] = gru.bh[...].at[-1].set(0.1)
    with pytest.raises(ValueError, match="non-zero b_hn"):
        gru.to_flax_cell()
    with pytest.raises(ValueError, match="residual SimpleCell"):
        bnnx.RNN.from_flax_cell(nnx.SimpleCell(N, N1, residual=True, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("cell,bidirectional", [("elman", True), ("gru", False), ("lstm", True)])
def test_stacked_rnn_equals_its_layers_and_autodiff(cell, bidirectional):
    # A 2-layer stack in one call: equal to the same weights as one RNN per layer (and nnx.Bidirectional
    # with concat for the reverse nets), and its gradients (of outputs and carries) to grad="autodiff".
    with jax.enable_x64(True):
        kw = dict(cell=cell, bidirectional=bidirectional, param_dtype=jnp.float64)
        stack = bnnx.StackedRNN(N, (N1, 5), rngs=nnx.Rngs(0), **kw)
        oracle = bnnx.StackedRNN(N, (N1, 5), grad="autodiff", rngs=nnx.Rngs(0), **kw)
        xs = jax.random.normal(jax.random.key(8), (3, T, N), jnp.float64)
        lengths = jnp.array([T, 4, 2])
        valid = _valid(lengths, T)
        carry, ys = stack(xs, seq_lengths=lengths, return_carry=True)
        assert ys.shape == (3, T, stack.out_features) and len(carry) == 2 * (1 + bidirectional)

        def one_layer(weights, n_in, n1):
            layer = bnnx.RNN(n_in, n1, cell=cell, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
            for name in bias_layouts.names(cell, "pytorch"):
                getattr(layer, name)[...] = getattr(weights, name)[...]
            return layer

        h = xs
        for k, n_in, n1 in ((0, N, N1), (1, 2 * N1 if bidirectional else N1, 5)):
            fwd = one_layer(stack.layers[k], n_in, n1)
            if bidirectional:
                bwd = one_layer(stack.reverse_layers[k], n_in, n1)
                h = nnx.Bidirectional(fwd, bwd, rngs=nnx.Rngs(0))(h, seq_lengths=lengths)
            else:
                h = fwd(h, seq_lengths=lengths)
        np.testing.assert_allclose(jnp.where(valid, ys, 0), jnp.where(valid, h, 0), atol=1e-12)

        loss = lambda m: _loss(*m(xs, seq_lengths=lengths, return_carry=True), valid)  # noqa: E731
        got = jax.tree_util.tree_leaves(nnx.state(nnx.grad(loss)(stack), nnx.Param))
        want = jax.tree_util.tree_leaves(nnx.state(nnx.grad(loss)(oracle), nnx.Param))
        assert len(got) == len(want) == len(bias_layouts.names(cell, "pytorch")) * 2 * (1 + bidirectional)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


class LayerGradientsTest(chex.TestCase):
    """Property: the layer's gradients (explicit BPTT) equal the same layer with grad="autodiff", over
    cells, batch layouts, lengths, reverse / keep_order and initial carries, in float64 and float32."""

    @chex.variants(with_jit=True)
    @settings(max_examples=min(6, settings().max_examples))
    @given(
        cell=st.sampled_from(["elman", "gru", "lstm"]),
        batch=st.sampled_from([(2,), (2, 2)]),
        t_len=st.integers(1, 5),
        reverse=st.booleans(),
        keep_order=st.booleans(),
        use_lengths=st.booleans(),
        use_carry=st.booleans(),
        dtype=st.sampled_from(["float64", "float32"]),
        seed=st.integers(0, 2**16),
    )
    def test_bptt_equals_autodiff(self, cell, batch, t_len, reverse, keep_order, use_lengths, use_carry, dtype, seed):
        with jax.enable_x64(True):
            dt = jnp.dtype(dtype)
            rng = np.random.RandomState(seed)
            xs = ref.on_device(rng.randn(*batch, t_len, N), dt)
            lengths = ref.on_device(rng.randint(0, t_len + 1, size=batch)) if use_lengths else None
            valid = (jnp.arange(t_len) < (t_len if lengths is None else lengths[..., None]))[..., None]
            carry = None
            if use_carry:
                h = lambda: ref.on_device(rng.randn(*batch, N1) * 0.5, dt)  # noqa: E731
                carry = (h(), h()) if cell == "lstm" else h()
            kw = dict(
                seq_lengths=lengths, initial_carry=carry, return_carry=True, reverse=reverse, keep_order=keep_order
            )

            def grads(grad):
                layer = bnnx.RNN(N, N1, cell=cell, grad=grad, param_dtype=dt, rngs=nnx.Rngs(seed % 7))
                graphdef, state = nnx.split(layer)

                def loss(state, carry):
                    c, ys = nnx.merge(graphdef, state)(xs, **dict(kw, initial_carry=carry))
                    return _loss(c, jnp.where(valid, ys, 0.0), valid)

                return self.variant(jax.grad(loss, argnums=(0, 1)))(state, carry)

            got, want = grads("bptt"), grads("autodiff")
            tol = 1e-10 if dtype == "float64" else 2e-4
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                scale = max(float(jnp.max(jnp.abs(b))), 1e-30)
                assert float(jnp.max(jnp.abs(a - b))) / scale < tol
