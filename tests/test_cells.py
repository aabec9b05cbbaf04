"""The gated cells (GRU, LSTM): their explicit, time-blocked BPTT equals jax.grad; their forward pass
equals a plain Python loop of PyTorch's equations (written in tests/reference.py, independently of
the library) and, where torch is installed, nn.GRU / nn.LSTM."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import cells, forward, kernels
from bptt_jax.core.vjp import rnn_states
from bptt_jax.layers.torch import expected_torch_shapes, from_torch_state_dict, to_torch_state_dict
from tests import reference as ref

GATED = ("gru", "lstm")
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-10}


def _autodiff(p: ref.Problem, output_mask=None):
    """jax.value_and_grad of the plain loss w.r.t. params, h0 (pairs for the LSTM) and xs."""
    h0 = p.h0 if p.h0 is not None else ref.zero_h0(p.spec, p.xs.shape[1], p.xs.dtype)

    def f(params, h0, xs):
        return bj.loss(
            params, p.spec, xs, p.targets, weights=p.weights, lengths=p.lengths, h0=h0, output_mask=output_mask
        )

    value, (g, dh0, dxs) = jax.value_and_grad(f, argnums=(0, 1, 2))(p.params, h0, p.xs)
    return value, g, dh0, dxs


def _check(
    p: ref.Problem,
    dtype,
    block=None,
    checkpoint_every=None,
    output_mask=None,
    variant=None,
    unroll=None,
    gates="auto",
    recurrence="auto",
):
    """bptt (through ``variant``: chex's with/without an outer jit, or called as is) against autodiff.
    ``gates="store"`` falls back to "auto" where it cannot apply (checkpoint_every)."""
    p = ref.cast(p, dtype)
    if gates == "store" and checkpoint_every is not None:
        gates = "auto"
    c = ref.block_size(block, p.xs.shape[0])
    run = (variant or (lambda f: f))(
        lambda params, xs, targets, weights, lengths, h0: bj.bptt(
            params,
            p.spec,
            xs,
            targets,
            weights=weights,
            lengths=lengths,
            h0=h0,
            block_size=c,
            checkpoint_every=checkpoint_every,
            output_mask=output_mask,
            unroll=unroll,
            gates=gates,
            with_dxs=True,
            diagnostics=True,
            recurrence=recurrence,
        )
    )
    value, grads, aux = run(p.params, p.xs, p.targets, p.weights, p.lengths, p.h0)
    want = _autodiff(p, output_mask)
    chex.assert_trees_all_equal_structs(grads, p.params)
    chex.assert_tree_all_finite((value, grads, aux.dh0, aux.dxs))
    got = (value, grads, aux.dh0, aux.dxs)
    err = ref.max_rel_err(got, want)
    if dtype == jnp.float32 and err >= TOL[dtype]:  # judge both float32 paths against float64
        with jax.enable_x64(True):
            truth = _autodiff(ref.cast(p, jnp.float64), output_mask)
        err = ref.float32_error(got, want, truth)
    assert err < TOL[dtype], f"spec={p.spec} T,B={p.xs.shape[:2]} lengths={p.lengths} C={c} err={err}"
    assert aux.dh_norms.shape == (p.xs.shape[0], p.spec.num_layers * p.spec.num_directions)
    return err


# ----------------------------------------------------------------------------- BPTT = jax.grad


UNROLLS = st.sampled_from((None, 1, 3))  # None: the backend's default (1 here, 8 on a GPU)
GATE_MODES = st.sampled_from(("store", "recompute"))  # the forward's gates kept, or recomputed per block


class GatedBPTTEqualsAutodiffTest(chex.TestCase):
    """GRU and LSTM stacks (1-2 layers, uni/bidirectional, lengths incl. 0 and T, weights, h0 pairs,
    every block-size kind, unroll drawn), with and without an outer jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=4)  # each example compiles new shapes; the suite's time is bounded (conftest)
    @given(problem=ref.problems(cells=GATED, max_layers=2), block=ref.BLOCKS, unroll=UNROLLS, gates=GATE_MODES)
    def test_float64(self, problem, block, unroll, gates):
        with jax.enable_x64(True):
            _check(problem, jnp.float64, block, variant=self.variant, unroll=unroll, gates=gates)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=4)
    @given(problem=ref.problems(cells=GATED, max_layers=2), block=ref.BLOCKS, unroll=UNROLLS, gates=GATE_MODES)
    def test_float32(self, problem, block, unroll, gates):
        _check(problem, jnp.float32, block, variant=self.variant, unroll=unroll, gates=gates)


def test_segments_and_output_mask_equal_autodiff():
    """checkpoint_every (segment recomputation) and output dropout masks, float64, on the LSTM (the
    paths are the same for every cell; the LSTM's two-part state is the one that could go wrong)."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4, 3), 5, cell="lstm")
        p = ref.make_problem(spec, 7, 3, seed=4, use_lengths=True, use_weights=True, use_h0=True)
        _check(p, jnp.float64, block="1", checkpoint_every=3)
        mask = jnp.asarray(np.random.RandomState(1).rand(7, 3, 3) > 0.3, jnp.float64) / 0.7
        _check(p, jnp.float64, block="nondivisor", output_mask=mask)


@pytest.mark.parametrize("cell", GATED)
def test_saturated_gates_equal_autodiff(cell):
    """Weights 8x larger drive the gates into saturation (sigmoid' and tanh' near 0)."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4,), 3, cell=cell, bidirectional=True)
        p = ref.make_problem(spec, 6, 2, seed=2, use_lengths=True, use_h0=True)
        p.params = jax.tree_util.tree_map(lambda a: a * 8.0, p.params)
        p.xs = p.xs * 3.0
        _check(p, jnp.float64, block="T")


@pytest.mark.parametrize("cell", GATED)
def test_finite_differences_float64(cell):
    with jax.enable_x64(True):
        spec = bj.RNNSpec(2, (3,), 2, cell=cell, output_activation="identity", divergence="squared_error")
        p = ref.cast(ref.make_problem(spec, 4, 2, seed=7, use_lengths=True, use_h0=True), jnp.float64)
        _, grads, _ = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, h0=p.h0, block_size=3)
        f = lambda params: bj.loss(params, spec, p.xs, p.targets, lengths=p.lengths, h0=p.h0)
        leaves, treedef = jax.tree_util.tree_flatten(p.params)
        eps = 1e-6
        for i, leaf in enumerate(leaves):
            flat = np.asarray(leaf).ravel()
            for j in range(0, flat.size, max(1, flat.size // 5)):  # a few entries of every array
                d = np.zeros_like(flat)
                d[j] = eps
                bump = lambda s, d=d, leaf=leaf, i=i: [
                    (lf + s * d.reshape(leaf.shape)) if k == i else lf for k, lf in enumerate(leaves)
                ]
                num = (
                    f(jax.tree_util.tree_unflatten(treedef, bump(1)))
                    - f(jax.tree_util.tree_unflatten(treedef, bump(-1)))
                ) / (2 * eps)
                got = np.asarray(jax.tree_util.tree_leaves(grads)[i]).ravel()[j]
                assert abs(got - float(num)) <= 1e-6 * max(1.0, abs(float(num))), (i, j, got, float(num))


# ----------------------------------------------------------------------------- the forward pass


@pytest.mark.parametrize("cell", GATED)
def test_forward_equals_python_loop_of_pytorch_equations(cell):
    """A bidirectional 2-layer stack with lengths and h0 (its forward nets are the unidirectional case)."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4, 2), 3, cell=cell, bidirectional=True, merge="concat")
        p = ref.cast(ref.make_problem(spec, 6, 3, seed=5, use_lengths=True, use_h0=True), jnp.float64)
        out = bj.forward(p.params, spec, p.xs, h0=p.h0, lengths=p.lengths)
        ys, hs = ref.loop_forward(p.params, spec, p.xs, p.h0, p.lengths)
        assert ref.max_rel_err(out.ys, ys) < 1e-12
        assert ref.max_rel_err(out.hs, tuple(hs)) < 1e-12


def test_gru_b_hn_is_inside_the_reset_gate():
    """b_hn multiplies r: moving it into b_in changes the output (so it must stay its own parameter),
    and the loop oracle (PyTorch's equations) agrees with the library for a non-zero b_hn."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(2, (3,), 2, cell="gru", output_activation="identity", divergence="squared_error")
        p = ref.cast(ref.make_problem(spec, 5, 2, seed=1), jnp.float64)
        layer = p.params.layers[0]
        layer = layer._replace(bh=layer.bh.at[6:].set(1.5))  # b_hn
        params = p.params._replace(layers=(layer,))
        got = bj.forward(params, spec, p.xs).ys
        want, _ = ref.loop_forward(params, spec, p.xs, ref.zero_h0(spec, 2, jnp.float64))
        assert ref.max_rel_err(got, want) < 1e-12
        folded = layer._replace(bx=layer.bx.at[6:].add(1.5), bh=layer.bh.at[6:].set(0.0))
        moved = bj.forward(params._replace(layers=(folded,)), spec, p.xs).ys
        assert ref.max_rel_err(moved, got) > 1e-3


def test_lstm_state_pairs_in_and_out():
    """h0 and dh0 are (h, c) pairs; h_last holds the final (h, c) of the forward pass."""
    spec = bj.RNNSpec(2, (3,), 2, cell="lstm", bidirectional=True)
    p = ref.make_problem(spec, 4, 2, seed=3, use_lengths=True, use_h0=True)
    _, _, aux = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, h0=p.h0)
    assert len(aux.dh0) == 2 and all(isinstance(e, tuple) and len(e) == 2 for e in aux.dh0)
    out = bj.forward(p.params, spec, p.xs, lengths=p.lengths, h0=p.h0)
    chex.assert_trees_all_close(out.h_last, aux.h_last, rtol=1e-5)  # forward: the scans; bptt: the kernel
    # the forward net's final h is its state at each sequence's last valid step
    last = np.asarray(p.lengths) - 1
    for b, t in enumerate(last):
        if t >= 0:
            np.testing.assert_allclose(out.h_last[0][0][b], out.hs[0][t, b], rtol=1e-6)


# ----------------------------------------------------------------------------- the custom VJP, vmap


def test_rnn_states_vjp_equals_autodiff_of_the_scans():
    """The custom VJP (stack_backward, as for bidirectional bptt) on an LSTM stack with (h, c) pairs."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4, 3), 2, cell="lstm", bidirectional=True)
        p = ref.cast(ref.make_problem(spec, 5, 2, seed=8, use_lengths=True, use_h0=True), jnp.float64)
        ct = jnp.asarray(np.random.RandomState(0).randn(5, 2, 6))
        f = lambda params, xs, h0: jnp.sum(rnn_states(params, spec, xs, h0=h0, lengths=p.lengths) * ct)

        def plain(params, xs, h0):
            h0_int = spec.internal_states(h0)
            tr = forward.run_stack(params, spec, xs, h0_int, p.lengths)
            return jnp.sum(tr[-1].merged * ct)

        got = jax.grad(f, argnums=(0, 1, 2))(p.params, p.xs, p.h0)
        want = jax.grad(plain, argnums=(0, 1, 2))(p.params, p.xs, p.h0)
        assert ref.max_rel_err(got, want) < 1e-10


def test_vmap_per_example_gradients_lstm():
    """bptt under vmap over examples equals one bptt call per example."""
    spec = bj.RNNSpec(2, (3,), 3, cell="lstm")
    p = ref.make_problem(spec, 4, 3, seed=2)
    per = jax.vmap(lambda x, d: bj.bptt(p.params, spec, x[:, None], d[:, None])[1], in_axes=(1, 1))(p.xs, p.targets)
    for b in range(3):
        one = bj.bptt(p.params, spec, p.xs[:, b : b + 1], p.targets[:, b : b + 1])[1]
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a, b=b: a[b], per), one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the API


def test_cells_registry_and_parameter_types():
    assert cells.NAMES == ("elman", "gru", "lstm")
    for name, typ, g in (("elman", bj.LayerParams, 1), ("gru", bj.GRUParams, 3), ("lstm", bj.LSTMParams, 4)):
        spec = bj.RNNSpec(2, (3, 4), 2, cell=name, bidirectional=True)
        params = bj.init_params(jax.random.key(0), spec)
        assert all(isinstance(layer, typ) for layer in params.layers + params.reverse_layers)
        assert cells.of(params.layers[0]) is cells.get(name) and cells.get(name).GATES == g
    lstm = bj.init_params(jax.random.key(0), bj.RNNSpec(2, (3,), 2, cell="lstm"), forget_bias=1.0)
    np.testing.assert_array_equal(lstm.layers[0].bx[3:6], 1.0)
    np.testing.assert_array_equal(lstm.layers[0].bh[3:6], 0.0)


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda: bj.RNNSpec(2, (3,), 2, cell="rnn"),
            r"RNNSpec.cell: unknown value 'rnn'; allowed: \['elman', 'gru', 'lstm'\]",
        ),
        (
            lambda: bj.RNNSpec(2, (3,), 2, cell="gru", activation="relu"),
            r"RNNSpec.activation: 'relu' applies to the Elman cell only; the gru cell has its own gate activations",
        ),
        (
            lambda: bj.init_params(jax.random.key(0), bj.RNNSpec(2, (3,), 2, cell="lstm"), scheme="identity"),
            r"scheme: 'identity' \(the IRNN\) is for the Elman cell, got spec.cell='lstm'",
        ),
        (
            lambda: bj.init_params(jax.random.key(0), bj.RNNSpec(2, (3,), 2, cell="gru"), forget_bias=1.0),
            r"forget_bias: applies to the LSTM cell only, got spec.cell='gru'",
        ),
        (
            lambda: kernels.resolve("pallas", (4,), jnp.float32, backend="cpu", cell="lstm"),
            r"recurrence='pallas': the kernels are the Elman cell's, got cell='lstm'",
        ),
    ],
)
def test_bad_gated_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_lstm_states_are_named():
    spec = bj.RNNSpec(2, (3,), 2, cell="lstm")
    p = ref.make_problem(spec, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"h0\[0\]: the LSTM's state is an \(h, c\) pair of \[B, N1\] arrays, got"):
        bj.bptt(p.params, spec, p.xs, p.targets, h0=(jnp.zeros((2, 3)),))
    with pytest.raises(ValueError, match=r"h0\[0\] \(c\): expected shape \(2, 3\) = \[B, N1\], got \(2, 4\)"):
        bj.forward(p.params, spec, p.xs, h0=((jnp.zeros((2, 3)), jnp.zeros((2, 4))),))
    gru = bj.init_params(jax.random.key(0), bj.RNNSpec(2, (3,), 2, cell="gru"))
    with pytest.raises(
        ValueError, match=r"params.layers\[0\]: expected a LSTMParams for spec.cell='lstm', got GRUParams"
    ):
        bj.loss(gru, spec, p.xs, p.targets)
    assert kernels.resolve("auto", (4,), jnp.float32, backend="gpu", cell="gru") == "scan"


# ----------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("cell", GATED)
def test_torch_state_dict_round_trip_keeps_both_biases(cell):
    spec = bj.RNNSpec(3, (4, 4), 2, cell=cell, bidirectional=True)
    params = bj.init_params(jax.random.key(0), spec)
    state = to_torch_state_dict(params, spec)
    g = 3 if cell == "gru" else 4
    assert list(state) == list(expected_torch_shapes(spec)) and state["rnn.weight_hh_l1_reverse"].shape == (g * 4, 4)
    np.testing.assert_array_equal(state["rnn.bias_hh_l0"], np.asarray(params.layers[0].bh))
    assert ref.max_rel_err(from_torch_state_dict(state, spec), params) == 0.0


@pytest.mark.parametrize("cell", GATED)
def test_gated_outputs_and_gradients_match_torch_on_packed_sequences(cell):
    """Optional cross-check (skipped without torch): a 2-layer bidirectional nn.GRU / nn.LSTM on a
    packed batch of different lengths, with a non-zero b_hn, gives our outputs, final states and
    gradients."""
    torch = pytest.importorskip("torch")
    spec = bj.RNNSpec(
        3, (4, 4), 2, cell=cell, bidirectional=True, output_activation="identity", divergence="squared_error"
    )
    params = bj.init_params(jax.random.key(3), spec, dtype=jnp.float32)
    rng = np.random.RandomState(0)
    t_len, batch = 6, 3
    xs = rng.randn(t_len, batch, 3).astype(np.float32)
    lengths = np.array([6, 2, 4])
    targets = rng.randn(t_len, batch, 2).astype(np.float32)
    rnn_cls = torch.nn.GRU if cell == "gru" else torch.nn.LSTM
    model = torch.nn.ModuleDict(
        {"rnn": rnn_cls(3, 4, num_layers=2, bidirectional=True), "readout": torch.nn.Linear(8, 2)}
    )
    model = model.double()
    model.load_state_dict(
        {k: torch.from_numpy(v.astype(np.float64)) for k, v in to_torch_state_dict(params, spec).items()}
    )
    x = torch.from_numpy(xs.astype(np.float64))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.from_numpy(lengths), enforce_sorted=False)
    out, _ = model["rnn"](packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=t_len)
    ys_t = model["readout"](out)
    mask = torch.from_numpy((np.arange(t_len)[:, None] < lengths[None, :]).astype(np.float64))
    loss_t = (((ys_t - torch.from_numpy(targets.astype(np.float64))) ** 2).sum(-1) * mask).sum() / batch
    loss_t.backward()
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        value, grads, _ = bj.bptt(
            p64, spec, ref.on_device(xs, jnp.float64), ref.on_device(targets, jnp.float64), lengths=lengths
        )
        ys = bj.forward(p64, spec, ref.on_device(xs, jnp.float64), lengths=lengths).ys
        grads_t = {k: v.grad.numpy() for k, v in model.named_parameters()}
        want = from_torch_state_dict(grads_t, spec, dtype=jnp.float64)
    valid = (np.arange(t_len)[:, None] < lengths[None, :])[..., None]
    np.testing.assert_allclose(
        np.where(valid, ys, 0.0), np.where(valid, ys_t.detach().numpy(), 0.0), rtol=1e-10, atol=1e-12
    )
    assert abs(float(value) - loss_t.item()) <= 1e-10 * abs(loss_t.item())
    assert ref.max_rel_err(grads, want) < 1e-9


def _dc_by_probe(p: ref.Problem, lengths):
    """dDIV/dc(t) per layer (L entries [T, B, N1]): jax.grad w.r.t. an additive probe on c(t) in a plain
    Python loop of PyTorch's LSTM equations (unidirectional stack, softmax + cross-entropy, zero h0;
    steps t >= lengths hold the state and weigh 0)."""
    spec, (t_len, b) = p.spec, p.xs.shape[:2]
    lengths = jnp.full((b,), t_len, jnp.int32) if lengths is None else lengths

    def loss_with_probe(eps):  # eps: L entries [T, B, N1], added to c(t) of each layer
        states = [(jnp.zeros((b, n1), p.xs.dtype), jnp.zeros((b, n1), p.xs.dtype)) for n1 in spec.hidden_sizes]
        tops = []
        for t in range(t_len):
            x_t = p.xs[t]
            valid = (t < lengths)[:, None]
            for k, layer in enumerate(p.params.layers):
                _, c = ref.lstm_step(layer, states[k], x_t)  # c(t) = f c(t-1) + i g
                c = jnp.where(valid, c, states[k][1]) + eps[k][t]
                n1 = c.shape[-1]
                o = jax.nn.sigmoid(
                    x_t @ layer.wx[:, 3 * n1 :]
                    + layer.bx[3 * n1 :]
                    + states[k][0] @ layer.wh[:, 3 * n1 :]
                    + layer.bh[3 * n1 :]
                )
                h = jnp.where(valid, o * jnp.tanh(c), states[k][0])  # h(t) = o tanh(c(t)), from the probed c(t)
                states[k] = (h, c)
                x_t = h
            tops.append(x_t)
        z2 = jnp.stack(tops) @ p.params.readout.w2 + p.params.readout.b2
        logp = jnp.take_along_axis(jax.nn.log_softmax(z2), p.targets[..., None], -1)[..., 0]  # [T, B]
        w = (jnp.arange(t_len)[:, None] < lengths[None, :]).astype(logp.dtype)
        return -(w * logp).sum() / b

    # jitted: one compile of the unrolled loop is ~2.5x faster than running it op by op
    return jax.jit(jax.grad(loss_with_probe))(tuple(jnp.zeros((t_len, b, n1), p.xs.dtype) for n1 in spec.hidden_sizes))


@pytest.mark.parametrize("block_size", [None, 1, 4])
def test_lstm_dc_norms_are_the_norm_of_ddiv_dc_t(block_size):
    """aux.dc_norms[t, k] = mean_b ||dDIV/dc(t)|| of layer k (the constant error carousel's gradient),
    against the probe oracle; with lengths (a held state's gradient is the carry) and 2 layers."""
    spec = bj.RNNSpec(2, (3, 2), 2, cell="lstm")
    t_len, b = 6, 3
    p = ref.make_problem(spec, t_len, b, seed=7)
    lengths = jnp.array([6, 4, 1], jnp.int32)
    _, _, aux = bj.bptt(p.params, spec, p.xs, p.targets, lengths=lengths, block_size=block_size, diagnostics=True)
    assert aux.dh_norms.shape == aux.dc_norms.shape == (t_len, 2)
    dc = _dc_by_probe(p, lengths)
    for k in range(2):
        want = jnp.linalg.norm(dc[k], axis=-1).mean(1)  # [T]
        np.testing.assert_allclose(aux.dc_norms[:, k], want, rtol=1e-5, atol=1e-7)
    # the Elman and GRU cells have no c(t): no dc_norms
    gru = bj.RNNSpec(2, (3,), 2, cell="gru")
    q = ref.make_problem(gru, t_len, b, seed=7)
    assert bj.bptt(q.params, gru, q.xs, q.targets, diagnostics=True)[2].dc_norms is None


class LSTMCellNormsPropertyTest(chex.TestCase):
    """aux.dc_norms against the probe oracle on drawn shapes, lengths (0 and T included) and block
    sizes: float64 to 1e-10, float32 to 1e-4 (relative, norms above 1e-6 of the largest)."""

    @chex.variants(with_jit=True, without_jit=True)
    @given(
        t_len=st.integers(1, 5),
        batch=st.integers(1, 3),
        hidden=st.lists(st.integers(1, 4), min_size=1, max_size=2),
        block=st.sampled_from([None, 1, 2]),
        seed=st.integers(0, 2**16),
        dtype=st.sampled_from([jnp.float64, jnp.float32]),
        gates=GATE_MODES,
    )
    def test_dc_norms_equal_probe_gradients(self, t_len, batch, hidden, block, seed, dtype, gates):
        with jax.enable_x64(True):
            spec = bj.RNNSpec(2, tuple(hidden), 3, cell="lstm")
            p = ref.cast(ref.make_problem(spec, t_len, batch, seed, use_lengths=True), dtype)
            f = self.variant(
                lambda params, xs, lengths: (
                    bj.bptt(
                        params, spec, xs, p.targets, lengths=lengths, block_size=block, diagnostics=True, gates=gates
                    )[2].dc_norms
                )
            )
            got = np.asarray(f(p.params, p.xs, p.lengths), np.float64)
            dc = _dc_by_probe(p, p.lengths)
            want = np.stack([np.asarray(jnp.linalg.norm(d, axis=-1).mean(1), np.float64) for d in dc], axis=1)
            tol = 1e-10 if dtype == jnp.float64 else 1e-4
            scale = max(float(np.abs(want).max()), 1e-30)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------- stored or recomputed gates


@pytest.mark.parametrize("cell", GATED)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_stored_gates_equal_recomputed_gates(cell, bidirectional):
    """gates="store" (the forward's gate activations kept) and "recompute" (recomputed per block) give
    the same DIV, gradients, dh0, dX and norms: 2 layers, uni- and bidirectional, lengths (0 and T),
    weights, h0, dropout mask, blocks of 3 steps (not dividing T); float64, to rounding."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4, 3), 2, cell=cell, bidirectional=bidirectional)
        p = ref.cast(ref.make_problem(spec, 7, 3, seed=11, use_weights=True), jnp.float64)
        lengths = jnp.array([7, 0, 4], jnp.int32)
        n_top = 3 * spec.num_directions
        mask = 2.0 * jax.random.bernoulli(jax.random.key(5), 0.5, (7, 3, n_top)).astype(jnp.float64)
        h0 = ref.zero_h0(spec, 3, jnp.float64)
        h0 = jax.tree_util.tree_map(lambda a: a + 0.1, h0)
        kw = dict(weights=p.weights, lengths=lengths, h0=h0, output_mask=mask, with_dxs=True, diagnostics=True)
        c = 3  # blocks that do not divide T (padding); other block sizes: the property tests above
        stored = bj.bptt(p.params, spec, p.xs, p.targets, block_size=c, gates="store", **kw)
        redone = bj.bptt(p.params, spec, p.xs, p.targets, block_size=c, gates="recompute", **kw)
        assert ref.max_rel_err(stored, redone) < 1e-12, cell


def test_gates_rule_and_bad_values():
    rule = importlib.import_module("bptt_jax.core.plan").resolve_gates
    lstm, gru = bj.RNNSpec(3, (4, 3), 2, cell="lstm"), bj.RNNSpec(3, (4,), 2, cell="gru")
    cap = importlib.import_module("bptt_jax.core.plan").STORE_ELEMENTS
    assert rule("auto", lstm, 10, 2, None)  # small: stored
    assert not rule("auto", lstm, cap // (4 * 7) + 1, 1, None)  # the caches (4 N1 per layer) over the cap
    assert not rule("auto", gru, 10**4, 2, 5)  # checkpoint_every recomputes
    floor = importlib.import_module("bptt_jax.core.cells.gru").STORE_FROM  # the GRU's: measured, 2^16
    assert floor == 2**16 and importlib.import_module("bptt_jax.core.cells.lstm").STORE_FROM == 0
    assert not rule("auto", gru, 10, 2, None)  # 320 cached elements: below the GRU's floor, recomputed
    assert not rule("auto", gru, floor // 16 - 1, 1, None) and rule("auto", gru, floor // 16, 1, None)
    bi = bj.RNNSpec(3, (4,), 2, cell="gru", bidirectional=True)
    assert rule("auto", bi, floor // 32, 1, None)  # both directions keep their gates (counted together)
    assert not rule("auto", bi, floor // 32 - 1, 1, None)
    assert not rule("auto", bi, cap // (4 * 4 * 2) + 1, 1, None)  # ... and against the cap
    assert not rule("auto", bj.RNNSpec(3, (4,), 2), 10, 2, None)  # the Elman cell has no gates
    assert rule("store", gru, 10**6, 10**3, None) and not rule("recompute", gru, 10, 2, None)
    p = ref.make_problem(gru, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"gates: expected one of \['auto', 'store', 'recompute'\], got 'keep'"):
        bj.bptt(p.params, gru, p.xs, p.targets, gates="keep")
    with pytest.raises(ValueError, match="gates='store': checkpoint_every recomputes its segments"):
        bj.bptt(p.params, gru, p.xs, p.targets, gates="store", checkpoint_every=2)
    elman = bj.RNNSpec(3, (4,), 2)
    q = ref.make_problem(elman, 4, 2, seed=0)
    with pytest.raises(ValueError, match="gates='store': the Elman cell has no gates"):
        bj.bptt(q.params, elman, q.xs, q.targets, gates="store")
