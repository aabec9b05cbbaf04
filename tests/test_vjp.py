"""jax.grad through bptt_jax.core.vjp.rnn_states (explicit BPTT) equals plain autodiff of the scan."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import forward
from bptt_jax.core.vjp import rnn_states
from tests import reference as ref


def _plain_states(params, spec, xs, h0, lengths):
    return forward.run_stack(params, spec, xs, h0, lengths)[-1].merged


def _h0(p):
    return p.h0 or tuple(jnp.zeros((p.xs.shape[1], n1), p.xs.dtype) for n1 in p.spec.state_sizes())


class CustomVJPTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(), seed=st.integers(0, 2**16))
    def test_random_cotangents_equal_autodiff(self, problem, seed):
        with jax.enable_x64(True):
            p = ref.cast(problem, jnp.float64)
            h0 = _h0(p)
            f = self.variant(lambda params, xs, h0: rnn_states(params, p.spec, xs, h0=h0, lengths=p.lengths))
            out, pullback = jax.vjp(f, p.params, p.xs, h0)
            want_out, want_pullback = jax.vjp(  # the oracle jitted: one program, not one per operation
                jax.jit(lambda a, b, c: _plain_states(a, p.spec, b, c, p.lengths)), p.params, p.xs, h0
            )
            ct = ref.on_device(np.random.RandomState(seed).randn(*out.shape), out.dtype)
            np.testing.assert_allclose(out, want_out, rtol=1e-12)
            got = pullback(ct)
            want = want_pullback(ct)
            # rnn_states ignores the readout: its gradient is zero in both.
            self.assertLess(ref.max_rel_err(got, want), 1e-10)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(max_layers=2))
    def test_downstream_attention_head(self, problem):
        """A loss nobody wrote into the library: attention over time then a nonlinearity."""
        with jax.enable_x64(True):
            p = ref.cast(problem, jnp.float64)
            h0 = _h0(p)

            def head(states):
                scores = jnp.einsum("tbf,f->tb", states, jnp.linspace(-1, 1, states.shape[-1]))
                alpha = jax.nn.softmax(scores, axis=0)
                ctx = jnp.einsum("tb,tbf->bf", alpha, states)
                return jnp.sum(jnp.cos(ctx) ** 2)

            g = self.variant(
                jax.grad(lambda a, b: head(rnn_states(a, p.spec, b, h0=h0, lengths=p.lengths)), argnums=(0, 1))
            )(p.params, p.xs)
            want = jax.jit(jax.grad(lambda a, b: head(_plain_states(a, p.spec, b, h0, p.lengths)), argnums=(0, 1)))(
                p.params, p.xs
            )
            self.assertLess(ref.max_rel_err(g, want), 1e-10)


def test_vmap_per_example_gradients():
    spec = bj.RNNSpec(2, (3, 3), 2, bidirectional=True)
    p = ref.make_problem(spec, 5, 1, seed=0)
    xs = jnp.asarray(np.random.RandomState(1).randn(4, 5, 1, 2), jnp.float32)  # 4 examples of [T, 1, N]
    loss = lambda params, x, states_fn: jnp.sum(states_fn(params, x) ** 2)
    custom = lambda params, x: rnn_states(params, spec, x)
    plain = lambda params, x: _plain_states(params, spec, x, forward.default_h0(spec, 1, x.dtype), None)
    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(p.params, xs, custom)
    want = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(p.params, xs, plain)
    assert g.layers[0].w1.shape == (4, 2, 3)
    assert ref.max_rel_err(g, want) < 1e-5
    # And each per-example gradient equals the gradient of that example alone.
    g2 = jax.grad(loss)(p.params, xs[2], custom)
    assert ref.max_rel_err(jax.tree_util.tree_map(lambda a: a[2], g), g2) < 1e-5


def test_inside_outer_scan():
    """rnn_states inside an outer lax.scan (e.g. over chunks), differentiated through."""
    spec = bj.RNNSpec(2, (3,), 2)
    p = ref.make_problem(spec, 4, 2, seed=0)
    chunks = jnp.asarray(np.random.RandomState(2).randn(3, 4, 2, 2), jnp.float32)

    def total(params, states_fn):
        def body(acc, x):
            return acc + jnp.sum(jnp.tanh(states_fn(params, x))), None

        return jax.lax.scan(body, 0.0, chunks)[0]

    custom = lambda params, x: rnn_states(params, spec, x)
    plain = lambda params, x: _plain_states(params, spec, x, forward.default_h0(spec, 2, x.dtype), None)
    g = jax.jit(jax.grad(total), static_argnums=1)(p.params, custom)
    want = jax.grad(total)(p.params, plain)
    assert ref.max_rel_err(g, want) < 1e-5


class FinalStatesTest(chex.TestCase):
    """rnn_states(..., return_last=True): cotangents on the states AND on every entry's final state
    (a carry handed to the next chunk, nnx.RNN's return_carry) equal autodiff of the plain scans."""

    @chex.variants(with_jit=True)
    @settings(max_examples=min(6, settings().max_examples))  # three compiles per example
    @given(
        problem=ref.problems(cells=("elman", "gru", "lstm")),
        seed=st.integers(0, 2**16),
        dtype=st.sampled_from(["float64", "float32"]),
    )
    def test_final_states_are_differentiable_too(self, problem, seed, dtype):
        with jax.enable_x64(True):
            p = ref.cast(problem, jnp.dtype(dtype))
            spec = p.spec
            tol = 1e-10 if dtype == "float64" else 2e-4

            def plain(params, xs, h0):
                traces = forward.run_stack(params, spec, xs, spec.internal_states(h0), p.lengths)
                return traces[-1].merged, spec.public_states(tuple(h[-1] for tr in traces for h in tr.states))

            h0 = p.h0 or ref.zero_h0(spec, p.xs.shape[1], p.xs.dtype)  # public: (h, c) pairs for the LSTM
            f = self.variant(
                lambda params, xs, h0: rnn_states(params, spec, xs, h0=h0, lengths=p.lengths, return_last=True)
            )
            out, pullback = jax.vjp(f, p.params, p.xs, h0)
            want_out, want_pullback = jax.vjp(jax.jit(plain), p.params, p.xs, h0)
            assert ref.max_rel_err(out, want_out) < (1e-12 if dtype == "float64" else 1e-5)
            rng = np.random.RandomState(seed)
            ct = jax.tree_util.tree_map(lambda a: ref.on_device(rng.randn(*a.shape), a.dtype), out)
            assert ref.max_rel_err(pullback(ct), want_pullback(ct)) < tol
            # The final states alone (states unused): only the carry's cotangent drives the gradient.
            ct_last_only = (jnp.zeros_like(out[0]), ct[1])
            assert ref.max_rel_err(pullback(ct_last_only), want_pullback(ct_last_only)) < tol
            # grad="autodiff" is that same plain computation (the layers' oracle)
            g = lambda a, b, c: rnn_states(a, spec, b, h0=c, lengths=p.lengths, return_last=True, grad="autodiff")  # noqa: E731
            assert ref.max_rel_err(jax.vjp(jax.jit(g), p.params, p.xs, h0)[1](ct), want_pullback(ct)) < tol
