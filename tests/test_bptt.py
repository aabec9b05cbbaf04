"""The explicit BPTT equals jax.grad, finite differences, and itself on padded batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import bptt_jax as bj
from bptt_jax.core.gradient import loss_and_state
from tests import reference as ref

TOL = {jnp.float32: 1e-5, jnp.float64: 1e-10}

# Largest errors seen by the property tests of this session, printed at the end of the run
# (pytest -s) so the closing note can quote measured figures.
MEASURED = {"float32": 0.0, "float64": 0.0}


def _autodiff(p: ref.Problem):
    """jax.value_and_grad of the plain loss w.r.t. params, h0 and xs (the oracle)."""
    h0 = p.h0 if p.h0 is not None else tuple(jnp.zeros((p.xs.shape[1], n1), p.xs.dtype) for n1 in p.spec.state_sizes())

    def f(params, h0, xs, targets, weights, lengths):
        return bj.loss(params, p.spec, xs, targets, weights=weights, lengths=lengths, h0=h0)

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    value, (g, dh0, dxs) = grad(p.params, h0, p.xs, p.targets, p.weights, p.lengths)
    return value, g, dh0, dxs


class BPTTEqualsAutodiffTest(chex.TestCase):
    def _check(self, p: ref.Problem, dtype, generic=False, block=None):
        p = ref.cast(p, dtype)
        c = ref.block_size(block, p.xs.shape[0])
        run = self.variant(
            lambda params, xs, targets, weights, lengths, h0: bj.bptt(
                params,
                p.spec,
                xs,
                targets,
                weights=weights,
                lengths=lengths,
                h0=h0,
                generic=generic,
                block_size=c,
                with_dxs=True,
                diagnostics=True,
            )
        )
        value, grads, aux = run(p.params, p.xs, p.targets, p.weights, p.lengths, p.h0)
        want_value, want_g, want_dh0, want_dxs = _autodiff(p)
        chex.assert_trees_all_equal_structs(grads, p.params)
        chex.assert_tree_all_finite((value, grads, aux))
        err = max(
            ref.max_rel_err(value, want_value),
            ref.max_rel_err(grads, want_g),
            ref.max_rel_err(aux.dh0, want_dh0),
            ref.max_rel_err(aux.dxs, want_dxs),
        )
        if dtype == jnp.float32 and err >= TOL[dtype]:  # judge both float32 paths against float64
            with jax.enable_x64(True):
                p64 = ref.cast(p, jnp.float64)
                truth = _autodiff(p64)
            err = ref.float32_error(
                (value, grads, aux.dh0, aux.dxs),
                (want_value, want_g, want_dh0, want_dxs),
                truth,
            )
        key = "float64" if dtype == jnp.float64 else "float32"
        MEASURED[key] = max(MEASURED[key], err)
        self.assertLess(err, TOL[dtype], msg=f"spec={p.spec} T,B={p.xs.shape[:2]} lengths={p.lengths} C={c}")
        self.assertEqual(aux.dh_norms.shape, (p.xs.shape[0], p.spec.num_layers * p.spec.num_directions))

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(bidirectional=False), block=ref.BLOCKS)
    def test_unidirectional_float64(self, problem, block):
        with jax.enable_x64(True):
            self._check(problem, jnp.float64, block=block)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(bidirectional=False), block=ref.BLOCKS)
    def test_unidirectional_float32(self, problem, block):
        self._check(problem, jnp.float32, block=block)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(bidirectional=True, lengths=True), block=ref.BLOCKS)
    def test_bidirectional_with_lengths_float64(self, problem, block):
        with jax.enable_x64(True):
            self._check(problem, jnp.float64, block=block)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(bidirectional=True), block=ref.BLOCKS)
    def test_bidirectional_float32(self, problem, block):
        self._check(problem, jnp.float32, block=block)

    @chex.variants(without_jit=True)
    @given(problem=ref.problems())
    def test_generic_jacobian_path_equals_fused(self, problem):
        with jax.enable_x64(True):
            p = ref.cast(problem, jnp.float64)
            fused = self.variant(
                lambda: bj.bptt(p.params, p.spec, p.xs, p.targets, weights=p.weights, lengths=p.lengths, h0=p.h0)
            )()
            generic = bj.bptt(
                p.params, p.spec, p.xs, p.targets, weights=p.weights, lengths=p.lengths, h0=p.h0, generic=True
            )
            self.assertLess(ref.max_rel_err(generic[:2], fused[:2]), 1e-10)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
def test_finite_differences_float64(bidirectional, activation):
    with jax.enable_x64(True):
        spec = bj.RNNSpec(2, (3, 2), 3, activation=activation, bidirectional=bidirectional)
        p = ref.cast(ref.make_problem(spec, 4, 2, seed=7, use_lengths=True, use_h0=True), jnp.float64)
        _, grads, aux = bj.bptt(
            p.params, spec, p.xs, p.targets, lengths=p.lengths, h0=p.h0, block_size=3, with_dxs=True
        )
        f = lambda params, xs: bj.loss(params, spec, xs, p.targets, lengths=p.lengths, h0=p.h0)
        flat, unravel = ravel_pytree((p.params, p.xs))
        g_flat, _ = ravel_pytree((grads, aux.dxs))
        eps = 1e-6
        rng = np.random.RandomState(0)
        for i in rng.choice(flat.size, size=min(40, flat.size), replace=False):
            e = jnp.zeros_like(flat).at[i].set(eps)
            fd = (f(*unravel(flat + e)) - f(*unravel(flat - e))) / (2 * eps)
            np.testing.assert_allclose(g_flat[i], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bidirectional,merge", [(False, "concat"), (True, "concat"), (True, "sum")])
def test_padded_batch_equals_sequences_alone(bidirectional, merge):
    """Loss and gradients of a padded batch equal the sum of each sequence run alone, unpadded."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4, 3), 5, bidirectional=bidirectional, merge=merge)
        p = ref.cast(ref.make_problem(spec, 7, 3, seed=3, use_h0=True), jnp.float64)
        lengths = jnp.array([7, 3, 5], jnp.int32)
        # Garbage in the padding must not matter.
        pad = jnp.arange(7)[:, None, None] >= lengths[None, :, None]
        xs = jnp.where(pad, 1e3, p.xs)
        value, grads, aux = bj.bptt(
            p.params, spec, xs, p.targets, lengths=lengths, h0=p.h0, block_size=2, with_dxs=True
        )
        total_v, total_g = 0.0, jax.tree_util.tree_map(jnp.zeros_like, p.params)
        for b in range(3):
            n = int(lengths[b])
            h0_b = tuple(h[b : b + 1] for h in p.h0)
            v, g, a = bj.bptt(p.params, spec, xs[:n, b : b + 1], p.targets[:n, b : b + 1], h0=h0_b, with_dxs=True)
            total_v += v / 3  # loss is a batch mean
            total_g = jax.tree_util.tree_map(lambda s, x: s + x / 3, total_g, g)
            np.testing.assert_allclose(aux.dxs[:n, b], a.dxs[:, 0] / 3, rtol=1e-10, atol=1e-14)
            for h_b, h_all in zip(a.dh0, aux.dh0):
                np.testing.assert_allclose(h_all[b], h_b[0] / 3, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(value, total_v, rtol=1e-12)
        assert ref.max_rel_err(grads, total_g) < 1e-10
        np.testing.assert_array_equal(np.asarray(aux.dxs)[np.asarray(pad)[..., 0]], 0.0)


def test_length_zero_gives_h0_gradient_only_from_final_state():
    """A sequence of length 0 contributes nothing to the loss and its dh0 is zero."""
    spec = bj.RNNSpec(2, (3,), 2)
    p = ref.make_problem(spec, 4, 2, seed=1)
    value, grads, aux = bj.bptt(p.params, spec, p.xs, p.targets, lengths=jnp.array([0, 4]))
    np.testing.assert_array_equal(aux.dh0[0][0], 0.0)
    assert float(jnp.abs(aux.dh0[0][1]).max()) > 0


def test_many_to_one_weights():
    """Weight 1 on the last valid step only: the loss is Div at that step, averaged over the batch."""
    spec = bj.RNNSpec(2, (3,), 1, output_activation="identity", divergence="squared_error")
    p = ref.make_problem(spec, 5, 2, seed=4)
    lengths = jnp.array([5, 2])
    w = jax.nn.one_hot(lengths - 1, 5).T  # [T, B]
    value, _, _ = bj.bptt(p.params, spec, p.xs, p.targets, weights=w, lengths=lengths)
    ys = bj.forward(p.params, spec, p.xs, lengths=lengths).ys
    want = ((ys[4, 0] - p.targets[4, 0]) ** 2).sum() + ((ys[1, 1] - p.targets[1, 1]) ** 2).sum()
    np.testing.assert_allclose(value, want / 2, rtol=1e-6)


@pytest.mark.parametrize("block_size", [None, 1, 2, 5])
def test_dh_norms_is_the_norm_of_dh_t(block_size):
    """dh_norms[t] = mean_b ||dDIV/dh(t)||, checked against jax.grad w.r.t. an additive probe on h(t)."""
    spec = bj.RNNSpec(2, (3,), 2)
    p = ref.make_problem(spec, 5, 2, seed=5)
    _, _, aux = bj.bptt(p.params, spec, p.xs, p.targets, block_size=block_size, diagnostics=True)
    layer = p.params.layers[0]

    def loss_with_probe(eps):  # eps: [T, B, N1] added to h(t) after the cell
        h = jnp.zeros((2, 3))
        hs = []
        for t in range(5):
            h = jax.numpy.tanh(p.xs[t] @ layer.w1 + h @ layer.w11 + layer.b1) + eps[t]
            hs.append(h)
        z2 = jnp.stack(hs) @ p.params.readout.w2 + p.params.readout.b2
        logp = jax.nn.log_softmax(z2)
        return -jnp.take_along_axis(logp, p.targets[..., None], -1).sum() / 2

    dh = jax.grad(loss_with_probe)(jnp.zeros((5, 2, 3)))
    np.testing.assert_allclose(aux.dh_norms[:, 0], jnp.linalg.norm(dh, axis=-1).mean(1), rtol=1e-5)


class OutputMaskTest(chex.TestCase):
    """Dropout on the readout's input (output_mask) through the explicit BPTT equals jax.grad."""

    def _check(self, problem, seed, dtype, tol):
        p = ref.cast(problem, dtype)
        c = ref.block_size(("1", "T", "nondivisor", "auto")[seed % 4], p.xs.shape[0])
        n_top = p.spec.merged_size(p.spec.num_layers - 1)
        rng = np.random.RandomState(seed)
        mask = ref.on_device((rng.rand(*p.xs.shape[:2], n_top) < 0.7) / 0.7, dtype)
        kw = dict(weights=p.weights, lengths=p.lengths, h0=p.h0, output_mask=mask)
        value, grads, aux = self.variant(
            lambda params, xs: bj.bptt(params, p.spec, xs, p.targets, block_size=c, with_dxs=True, **kw)
        )(p.params, p.xs)
        f = lambda params, xs: bj.loss(params, p.spec, xs, p.targets, **kw)
        want_v, (want_g, want_dxs) = jax.value_and_grad(f, argnums=(0, 1))(p.params, p.xs)
        self.assertLess(ref.max_rel_err((value, grads, aux.dxs), (want_v, want_g, want_dxs)), tol)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(), seed=st.integers(0, 2**16))
    def test_output_mask_float64(self, problem, seed):
        with jax.enable_x64(True):
            self._check(problem, seed, jnp.float64, 1e-10)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(), seed=st.integers(0, 2**16))
    def test_output_mask_float32(self, problem, seed):
        self._check(problem, seed, jnp.float32, 1e-5)


def test_output_mask_shape_error():
    spec = bj.RNNSpec(3, (4, 3), 5, bidirectional=True)
    p = ref.make_problem(spec, 5, 2, seed=11)
    with pytest.raises(ValueError, match=r"output_mask: expected shape \(5, 2, 6\) = \[T, B, N_top\], got \(5, 2, 1\)"):
        bj.bptt(p.params, spec, p.xs, p.targets, output_mask=jnp.ones((5, 2, 1)))


@given(problem=ref.problems())
def test_loss_and_state_gives_the_forward_final_states(problem):
    """The autodiff train path's (DIV, final states) in one pass: equals loss and forward().h_last.

    The final states come from a different XLA program (the forward inside value_and_grad) than
    forward()'s, so they agree to rounding, not bit for bit: compiled at another LLVM optimisation
    level (tests/conftest.py) they differed by one float32 ulp (5e-8 relative)."""
    p = problem
    kw = dict(weights=p.weights, lengths=p.lengths, h0=p.h0)
    (value, h_last), grads = jax.value_and_grad(
        lambda q: loss_and_state(q, p.spec, p.xs, p.targets, **kw), has_aux=True
    )(p.params)
    assert ref.max_rel_err(value, bj.loss(p.params, p.spec, p.xs, p.targets, **kw)) < 1e-6
    want = bj.forward(p.params, p.spec, p.xs, h0=p.h0, lengths=p.lengths).h_last
    tol = 1e-6 if p.xs.dtype == jnp.float32 else 1e-14
    assert ref.max_rel_err(h_last, want) <= tol
