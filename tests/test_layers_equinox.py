"""bptt_jax.layers.equinox.RNN: equal to Equinox's own cells scanned (forward and gradients, float64),
per-example gradients under jax.vmap equal to per-example autodiff, training with
eqx.filter_value_and_grad, serialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")

from bptt_jax.layers import equinox as beqx  # noqa: E402

T, N, N1 = 6, 3, 4


def _scan_eqx_cell(cell, xs, lstm):
    h = (jnp.zeros(N1, xs.dtype), jnp.zeros(N1, xs.dtype)) if lstm else jnp.zeros(N1, xs.dtype)

    def step(h, x):
        h = cell(x, h)
        return h, h[0] if lstm else h

    return jax.lax.scan(step, h, xs)


def _loss_of(hs, last):
    w = jnp.linspace(-1.0, 1.0, hs.shape[-1])
    return jnp.sum(jnp.tanh(hs @ w) ** 2) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree_util.tree_leaves(last))


@pytest.mark.parametrize("name", ["GRUCell", "LSTMCell"])
def test_equals_equinox_cells_forward_and_gradients(name):
    with jax.enable_x64(True):
        cell = getattr(eqx.nn, name)(N, N1, dtype=jnp.float64, key=jax.random.key(1))
        if name == "GRUCell":  # a non-zero b_hn, so dropping it would show
            cell = eqx.tree_at(lambda c: c.bias_n, cell, jnp.linspace(-0.5, 0.5, N1))
        lstm = name == "LSTMCell"
        ours = beqx.RNN.from_eqx_cell(cell, dtype=jnp.float64)
        xs = jax.random.normal(jax.random.key(2), (T, N), jnp.float64)
        last_want, want = _scan_eqx_cell(cell, xs, lstm)
        got, last_got = ours(xs, return_last=True)
        np.testing.assert_allclose(got, want, atol=1e-13)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-13), last_got, last_want)

        g_all = eqx.filter_grad(lambda m: _loss_of(*m(xs, return_last=True)))(ours)
        g_ours = g_all.layer
        assert g_ours.bh is None  # the cell's biases only: bias (bx) and, for the GRU, bias_n
        g_cell = eqx.filter_grad(lambda c: _loss_of(*_scan_eqx_cell(c, xs, lstm)[::-1]))(cell)
        np.testing.assert_allclose(g_ours.wx, g_cell.weight_ih.T, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g_ours.wh, g_cell.weight_hh.T, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g_ours.bx, g_cell.bias, rtol=1e-10, atol=1e-13)
        if name == "GRUCell":
            np.testing.assert_allclose(g_all.bias_n, g_cell.bias_n, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_vmap_per_example_gradients_equal_autodiff(cell):
    # jax.vmap of the per-sequence gradient (the explicit BPTT, batched) = the same with grad="autodiff",
    # with lengths (steps past a sequence's length hold its state) and a given initial state.
    with jax.enable_x64(True):
        key = jax.random.key(3)
        ours = beqx.RNN(N, N1, cell=cell, dtype=jnp.float64, key=key)
        oracle = beqx.RNN(N, N1, cell=cell, dtype=jnp.float64, grad="autodiff", key=key)
        xs = jax.random.normal(jax.random.key(4), (5, T, N), jnp.float64)
        lengths = jnp.array([T, 4, 1, 0, 3])
        h = jax.random.normal(jax.random.key(5), (5, N1), jnp.float64) * 0.5
        h0 = (h, -h) if cell == "lstm" else h

        def per_example(model, x, length, h0):
            return eqx.filter_grad(lambda m: _loss_of(*m(x, h0, length=length, return_last=True)))(model).layer

        got = jax.vmap(per_example, in_axes=(None, 0, 0, 0))(ours, xs, lengths, h0)
        want = jax.vmap(per_example, in_axes=(None, 0, 0, 0))(oracle, xs, lengths, h0)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        # a sequence of length 0 returns its initial state and gets no weight gradient from the states
        hs, last = ours(xs[3], jax.tree_util.tree_map(lambda a: a[3], h0), length=0, return_last=True)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b[3]), last, h0)


@pytest.mark.parametrize("name", ["GRUCell", "LSTMCell"])
def test_a_switched_model_trains_as_the_equinox_cell_step_for_step(name):
    # from_eqx_cell trains exactly the cell's arrays (the GRU's bias and bias_n, the LSTM's bias), so
    # five Adam steps, vmapped over a batch, equal the same cell scanned by hand: losses and weights.
    lstm = name == "LSTMCell"
    with jax.enable_x64(True):
        cell = getattr(eqx.nn, name)(N, N1, dtype=jnp.float64, key=jax.random.key(9))
        xs = jax.random.normal(jax.random.key(10), (3, T, N), jnp.float64)

        def train(model, run):
            opt = optax.adam(0.05)
            state = opt.init(eqx.filter(model, eqx.is_array))

            @eqx.filter_jit
            def step(model, state):
                value, g = eqx.filter_value_and_grad(lambda m: jnp.sum(jax.vmap(lambda x: run(m, x))(xs)))(model)
                updates, state = opt.update(g, state, model)
                return eqx.apply_updates(model, updates), state, value

            values = []
            for _ in range(5):
                model, state, value = step(model, state)
                values.append(float(value))
            return model, np.array(values)

        ref, want = train(cell, lambda c, x: _loss_of(*_scan_eqx_cell(c, x, lstm)[::-1]))
        ours, got = train(
            beqx.RNN.from_eqx_cell(cell, dtype=jnp.float64), lambda m, x: _loss_of(*m(x, return_last=True))
        )
        assert want[-1] < want[0]
        np.testing.assert_allclose(got, want, rtol=1e-10)
        trained = beqx.RNN.from_eqx_cell(ref, dtype=jnp.float64)  # the trained cell's weights, our layout
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(trained)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
        n_leaves = len(jax.tree_util.tree_leaves(eqx.filter(ours, eqx.is_array)))
        assert n_leaves == len(jax.tree_util.tree_leaves(eqx.filter(cell, eqx.is_array)))  # no leaf the cell lacks


def test_training_and_serialisation(tmp_path):
    model = beqx.RNN(N, N1, cell="lstm", forget_bias=1.0, key=jax.random.key(6))
    head = jnp.ones((N1,))
    xs = jax.random.normal(jax.random.key(7), (8, T, N))
    ys = jnp.sum(xs[..., 0], axis=1)  # a sum over time: needs memory

    @eqx.filter_jit
    def step(model, opt_state):
        def loss(m):
            pred = jax.vmap(lambda x: m(x)[-1] @ head)(xs)
            return jnp.mean((pred - ys) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = opt.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, value

    opt = optax.adam(0.05)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    values = []
    for _ in range(15):
        model, opt_state, value = step(model, opt_state)
        values.append(float(value))
    assert values[-1] < 0.7 * values[0], values
    path = tmp_path / "rnn.eqx"
    eqx.tree_serialise_leaves(path, model)
    again = eqx.tree_deserialise_leaves(path, beqx.RNN(N, N1, cell="lstm", key=jax.random.key(0)))
    np.testing.assert_array_equal(again(xs[0]), model(xs[0]))


def test_named_errors():
    rnn = beqx.RNN(N, N1, cell="lstm", key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"xs: expected one sequence \[T, 3\] or a batch \[B, T, 3\]"):
        rnn(jnp.zeros((2, 2, T, N)))
    for empty in (jnp.zeros((0, N)), jnp.zeros((2, 0, N)), jnp.zeros((0, T, N))):  # no steps, or no sequences
        with pytest.raises(ValueError, match=r"xs: expected T >= 1 steps \(and B >= 1 sequences\)"):
            rnn(empty)
    with pytest.raises(ValueError, match=r"xs: expected T >= 1"):
        jax.vmap(rnn)(jnp.zeros((2, 0, N)))
    with pytest.raises(ValueError, match=r"length: expected shape \(2,\) \(one per sequence\)"):
        rnn(jnp.zeros((2, T, N)), length=3)
    for bad in (T + 1, -1, np.array([0, T + 2])):  # host values are read: in [0, T]
        xs_bad = jnp.zeros((T, N)) if np.ndim(bad) == 0 else jnp.zeros((2, T, N))
        with pytest.raises(ValueError, match=rf"length: expected values in \[0, T={T}\], got min"):
            rnn(xs_bad, length=bad)
    with pytest.raises(TypeError, match="length: expected an integer dtype, got float"):
        rnn(jnp.zeros((T, N)), length=2.0)
    assert rnn(jnp.zeros((T, N)), length=jnp.int32(T + 3)).shape == (T, N1)  # a device value is not read back
    with pytest.raises(ValueError, match=r"h0: the LSTM's state is a pair \(h, c\)"):
        rnn(jnp.zeros((T, N)), jnp.zeros(N1))
    with pytest.raises(ValueError, match=r"h0: expected shape \(4,\)"):
        rnn(jnp.zeros((T, N)), (jnp.zeros(N1 + 1), jnp.zeros(N1)))
    with pytest.raises(ValueError, match="from_eqx_cell: expected eqx.nn.GRUCell or eqx.nn.LSTMCell"):
        beqx.RNN.from_eqx_cell(eqx.nn.Linear(2, 2, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="grad: expected 'bptt' or 'autodiff'"):
        beqx.RNN(N, N1, grad="other", key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"biases: expected one of \['pytorch', 'flax', 'equinox', 'none'\]"):
        beqx.RNN(N, N1, cell="gru", biases="torch", key=jax.random.key(0))


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_float32_inputs_into_a_float64_layer_are_promoted(cell):
    # Inputs whose dtype differs from the weights' are promoted (as Flax does): float64 states, and
    # the explicit BPTT's gradients equal autodiff's (grad="autodiff"), both taking float32 inputs.
    with jax.enable_x64(True):
        key = jax.random.key(11)
        ours = beqx.RNN(N, N1, cell=cell, dtype=jnp.float64, key=key)
        oracle = beqx.RNN(N, N1, cell=cell, dtype=jnp.float64, grad="autodiff", key=key)
        xs = jax.random.normal(jax.random.key(12), (T, N), jnp.float32)
        assert ours(xs).dtype == jnp.float64
        grad = lambda m: eqx.filter_grad(lambda m: _loss_of(*m(xs, length=4, return_last=True)))(m).layer
        for a, b in zip(grad(ours), grad(oracle)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_a_batch_in_one_call_equals_vmap(cell):
    # xs [B, T, N] in one call: the states, final states and the summed loss's gradients equal
    # jax.vmap over the sequences (the Equinox way) and autodiff's, with lengths and h0.
    with jax.enable_x64(True):
        key = jax.random.key(13)
        ours = beqx.RNN(N, N1, cell=cell, dtype=jnp.float64, key=key)
        oracle = beqx.RNN(N, N1, cell=cell, dtype=jnp.float64, grad="autodiff", key=key)
        xs = jax.random.normal(jax.random.key(14), (4, T, N), jnp.float64)
        lengths = jnp.array([T, 2, 0, 5])
        h = jax.random.normal(jax.random.key(15), (4, N1), jnp.float64) * 0.5
        h0 = (h, -h) if cell == "lstm" else h

        def batched(m):
            return _loss_of(*m(xs, h0, length=lengths, return_last=True))

        def vmapped(m):
            hs, last = jax.vmap(lambda x, h, n: m(x, h, length=n, return_last=True))(xs, h0, lengths)
            return _loss_of(hs, last)

        hs, last = ours(xs, h0, length=lengths, return_last=True)
        hs_v, last_v = jax.vmap(lambda x, h, n: ours(x, h, length=n, return_last=True))(xs, h0, lengths)
        np.testing.assert_allclose(hs, hs_v, rtol=1e-13, atol=1e-14)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14), last, last_v)
        got = eqx.filter_grad(batched)(ours).layer
        for want in (eqx.filter_grad(vmapped)(ours).layer, eqx.filter_grad(batched)(oracle).layer):
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

        # dX and dh0 too: the vmapped calls (core.sequence: autodiff's matmuls around the reverse
        # recurrence) against the batch call (rnn_states' custom VJP) and autodiff
        def inputs_loss(m, vmap):
            def f(x, h):
                if vmap:
                    hs, last = jax.vmap(lambda x, h, n: m(x, h, length=n, return_last=True))(x, h, lengths)
                else:
                    hs, last = m(x, h, length=lengths, return_last=True)
                return _loss_of(hs, last)

            return jax.grad(f, argnums=(0, 1))(xs, h0)

        got = inputs_loss(ours, True)
        for want in (inputs_loss(ours, False), inputs_loss(oracle, True)):
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)


def test_one_sequence_calls_run_the_recurrence_alone_custom_vjp(monkeypatch):
    """A one-sequence call (so each of a vmapped batch) runs core.sequence.layer_states, whose weight
    gradients jax.vmap batches; gates='recompute', segments or a budget keep rnn_states."""
    from bptt_jax.core import sequence

    calls = []
    real = sequence.layer_states
    monkeypatch.setattr(sequence, "layer_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs = jnp.ones((2, T, N))
    jax.vmap(beqx.RNN(N, N1, cell="gru", key=jax.random.key(0)))(xs)
    assert len(calls) == 1
    for kw in ({"gates": "recompute"}, {"checkpoint_every": 2}, {"max_memory": "1GiB"}, {"grad": "autodiff"}):
        jax.vmap(beqx.RNN(N, N1, cell="gru", key=jax.random.key(0), **kw))(xs)
        beqx.RNN(N, N1, cell="gru", key=jax.random.key(0))(xs)  # the batch call: rnn_states
    assert len(calls) == 1
