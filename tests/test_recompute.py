"""BPTT with segment recomputation (checkpoint_every=k) equals the plain BPTT and jax.grad."""

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from tests import reference as ref

CELLS = ("elman", "gru", "lstm")


class SegmentsTest(chex.TestCase):
    """Uni- and bidirectional stacks of every cell, lengths (0 and T among them), weights, h0: the
    segments' DIV, gradients, dh0, h_last, dxs and ||dh(t)|| equal the plain BPTT's; DIV and the
    gradients equal jax.value_and_grad's."""

    def _check(self, problem, every, dtype, tol, block=None):
        p = ref.cast(problem, dtype)
        kw = dict(weights=p.weights, lengths=p.lengths, h0=p.h0, with_dxs=True, diagnostics=True)
        c = ref.block_size(block, p.xs.shape[0])
        seg = self.variant(
            lambda params, xs: bj.bptt(params, p.spec, xs, p.targets, checkpoint_every=every, block_size=c, **kw)
        )(p.params, p.xs)
        plain = bj.bptt(p.params, p.spec, p.xs, p.targets, **kw)
        self.assertLess(ref.max_rel_err(seg, plain), tol)
        kw = dict(weights=p.weights, lengths=p.lengths, h0=p.h0)
        value, auto = jax.value_and_grad(lambda q: bj.loss(q, p.spec, p.xs, p.targets, **kw))(p.params)
        self.assertLess(ref.max_rel_err((seg[0], seg[1]), (value, auto)), tol)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(max_t=9, max_layers=2, cells=CELLS), every=st.integers(1, 10), block=ref.BLOCKS)
    def test_segments_equal_plain_bptt_and_autodiff_float64(self, problem, every, block):
        with jax.enable_x64(True):
            self._check(problem, every, jnp.float64, 1e-10, block)

    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems(max_t=9, max_layers=2, cells=CELLS), every=st.integers(1, 10), block=ref.BLOCKS)
    def test_segments_equal_plain_bptt_and_autodiff_float32(self, problem, every, block):
        self._check(problem, every, jnp.float32, 1e-5, block)


class StatesSegmentsTest(chex.TestCase):
    """``rnn_states(checkpoint_every=k)`` (the layers' custom VJP; unidirectional and bidirectional
    stacks, any k from 1 to T + 1: the last segment padded where k does not divide T; nested levels
    (k, d)) of every cell,
    one or two layers, concat and sum merges,
    lengths (0 and T among them), h0, the final states
    differentiated too: the gradients of params, xs and h0 equal grad="autodiff"'s (jax.grad through
    the plain scans)."""

    @staticmethod
    def _grads(problem, grad, every):
        """d(sum(states * probe) + sum(tanh(final states)))/d(params, xs, h0) in the problem's dtype."""
        from bptt_jax.core.vjp import rnn_states

        p = problem
        t_len, batch = p.xs.shape[:2]
        dtype = p.xs.dtype
        h0 = p.h0 if p.h0 is not None else ref.zero_h0(p.spec, batch, dtype)
        probe = jnp.cos(jnp.arange(t_len * batch * p.spec.merged_size(-1), dtype=dtype)).reshape(t_len, batch, -1)

        def f(params, xs, h0):
            kw = dict(lengths=p.lengths, return_last=True, grad=grad, checkpoint_every=every)
            states, last = rnn_states(params, p.spec, xs, h0=h0, **kw)
            return jnp.sum(states * probe) + sum(jnp.sum(jnp.tanh(a)) for a in jax.tree.leaves(last))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(p.params, p.xs, h0)  # one program, not one per op

    def _k(self, problem, k_index):
        """k in 1 .. T + 1: divisors of T, others (the last segment padded) and one beyond T; for an
        odd k_index, nested levels (k, d): d the largest proper divisor of k."""
        k = 1 + k_index % (problem.xs.shape[0] + 1)
        if k_index % 2 == 0 or k == 1:
            return k
        return (k, max(d for d in range(1, k) if k % d == 0))

    @chex.variants(with_jit=True)
    @settings(max_examples=6)
    @given(problem=ref.problems(max_t=8, max_layers=2, cells=CELLS), k_index=st.integers(0, 9))
    def test_rnn_states_segments_equal_autodiff_float64(self, problem, k_index):
        with jax.enable_x64(True):
            p = ref.cast(problem, jnp.float64)
            got = self.variant(lambda: self._grads(p, "bptt", self._k(p, k_index)))()
            self.assertLess(ref.max_rel_err(got, self._grads(p, "autodiff", None)), 1e-10)

    @chex.variants(with_jit=True)
    @settings(max_examples=4)
    @given(problem=ref.problems(max_t=8, max_layers=2, cells=CELLS), k_index=st.integers(0, 9))
    def test_rnn_states_segments_as_accurate_as_autodiff_float32(self, problem, k_index):
        """float32: both gradients judged against the float64 one (a small gradient array's relative
        difference between two float32 computations can reach 1e-4): the segments' error within
        1.5x autodiff's, plus 1e-5."""
        p = ref.cast(problem, jnp.float32)
        got = self.variant(lambda: self._grads(p, "bptt", self._k(p, k_index)))()
        theirs = self._grads(p, "autodiff", None)
        with jax.enable_x64(True):
            truth = self._grads(ref.cast(problem, jnp.float64), "autodiff", None)
            e_ours, e_theirs = ref.max_rel_err(got, truth), ref.max_rel_err(theirs, truth)
        self.assertLess(e_ours, 1.5 * e_theirs + 1e-5, (e_ours, e_theirs))


def test_diagnostics_off_gives_same_gradients():
    spec = bj.RNNSpec(3, (4,), 5)
    p = ref.make_problem(spec, 6, 2, seed=0)
    a = bj.bptt(p.params, spec, p.xs, p.targets, diagnostics=True, with_dxs=True)
    b = bj.bptt(p.params, spec, p.xs, p.targets)  # the defaults: no dh_norms, no dxs
    assert b[2].dxs is None and b[2].dh_norms is None
    assert a[2].dxs.shape == p.xs.shape and a[2].dh_norms.shape == (6, 1)
    assert ref.max_rel_err(b[:2], a[:2]) < 1e-6


@st.composite
def nested_levels(draw) -> tuple[int, ...]:
    """Two or three levels (k1, k2[, k3]), each a multiple (2-3x) of the next, the innermost 1-3."""
    levels = [draw(st.integers(1, 3))]
    for f in draw(st.lists(st.integers(2, 3), min_size=1, max_size=2)):
        levels.insert(0, levels[0] * f)
    return tuple(levels)


NESTED_PROBLEMS = ref.problems(max_t=12, max_layers=2, cells=CELLS)


class NestedSegmentsTest(chex.TestCase):
    """checkpoint_every=(k1, k2[, k3]): segments of segments equal the plain BPTT and jax.grad, for
    uni- and bidirectional stacks (DIV, gradients, dh0, h_last, dxs and ||dh(t)||)."""

    @chex.variants(with_jit=True)  # the levels are Python structure: an outer jit changes nothing else
    @settings(max_examples=6)
    @given(problem=NESTED_PROBLEMS, levels=nested_levels())
    def test_nested_segments_equal_plain_bptt_and_autodiff_float64(self, problem, levels):
        with jax.enable_x64(True):
            SegmentsTest._check(self, problem, levels, jnp.float64, 1e-10)

    @chex.variants(with_jit=True)
    @settings(max_examples=4)
    @given(problem=ref.problems(bidirectional=False, max_t=12, max_layers=2, cells=CELLS), levels=nested_levels())
    def test_nested_segments_equal_plain_bptt_and_autodiff_float32(self, problem, levels):
        """float32 (unidirectional; bidirectional ones in float64 above and in StatesSegmentsTest)."""
        SegmentsTest._check(self, problem, levels, jnp.float32, 1e-5)


def test_segment_errors():
    spec = bj.RNNSpec(3, (4,), 5, bidirectional=True)
    p = ref.make_problem(spec, 6, 2, seed=0)
    with pytest.raises(ValueError, match=r"checkpoint_every: cannot be combined with output_mask"):
        bj.bptt(p.params, spec, p.xs, p.targets, checkpoint_every=2, output_mask=jnp.ones((6, 2, 8)))
    with pytest.raises(ValueError, match=r"checkpoint_every: expected a positive int or None, got 0"):
        bj.bptt(p.params, spec, p.xs, p.targets, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"checkpoint_every: expected a positive int, None, or a tuple"):
        bj.bptt(p.params, spec, p.xs, p.targets, checkpoint_every=(4, 3))  # bidirectional: checked alike
    uni = bj.RNNSpec(3, (4,), 5)
    q = ref.make_problem(uni, 6, 2, seed=0)
    for bad in [(4, 3), (2, 4), (4, 4), (), (4, 0), (4, True), [6, 2.0]]:
        with pytest.raises(ValueError, match=r"checkpoint_every: expected a positive int, None, or a tuple"):
            bj.bptt(q.params, uni, q.xs, q.targets, checkpoint_every=bad)
    listed = bj.bptt(q.params, uni, q.xs, q.targets, checkpoint_every=[6, 3])  # a list: the tuple (was a TypeError)
    assert ref.max_rel_err(listed, bj.bptt(q.params, uni, q.xs, q.targets, checkpoint_every=(6, 3))) == 0
    one = bj.bptt(q.params, uni, q.xs, q.targets, checkpoint_every=(3,))  # one level: the int
    assert ref.max_rel_err(one, bj.bptt(q.params, uni, q.xs, q.targets, checkpoint_every=3)) == 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_nested_segments_keep_fewer_states(bidirectional):
    """At T = 512 the compiled temp memory of (64, 8) (512/64 + 64/8 + 8 = 24 states) is below one
    level of 16 steps (512/16 + 16 = 48 states) and of the plain BPTT; same gradients. Uni- and
    bidirectional (where each boundary is found chunk by chunk: a whole k1-step segment's states
    at a time would be 64)."""
    from bptt_jax.core import budget

    spec = bj.RNNSpec(4, (32,), 4, cell="gru", bidirectional=bidirectional)
    p = ref.make_problem(spec, 512, 4, seed=1)
    temp = {}
    for every in (None, 16, (64, 8)):
        fn = jax.jit(lambda params, xs, e=every: bj.bptt(params, spec, xs, p.targets, checkpoint_every=e)[:2])
        temp[every] = budget.temp_bytes(fn.lower(p.params, p.xs).compile())
        assert ref.max_rel_err(fn(p.params, p.xs), bj.bptt(p.params, spec, p.xs, p.targets)[:2]) < 1e-5
    assert temp[(64, 8)] < temp[16] < temp[None], temp


@pytest.mark.parametrize("bidirectional", [False, True])
def test_segments_read_their_inputs_in_place(bidirectional):
    """rnn_states' forward + backward with segments (the custom VJP: dX always computed), at inputs
    wider than the states (N 64, N1 8, T 256, B 4): nested segments (64, 4) keep less temp memory
    than one 64-step slice of X (the forward and backward read each 4-step window where it lies;
    they used to copy every 64-step segment of X, its projection and its dtop), and a
    bidirectional layer with segments of 16 less than half of X (its two sweeps add into one dX;
    it used to hold a second [T, B, N] dX); the gradients equal grad="autodiff"'s."""
    from bptt_jax.core import budget
    from bptt_jax.core.vjp import rnn_states

    t_len, batch, n, n1 = 256, 4, 64, 8
    every = 16 if bidirectional else (64, 4)
    bound = t_len * batch * n * 4 // 2 if bidirectional else 64 * batch * n * 4
    for cell in ("elman", "gru", "lstm"):
        spec = bj.RNNSpec(n, (n1,), 2, cell=cell, bidirectional=bidirectional)
        p = ref.make_problem(spec, t_len, batch, seed=3, use_lengths=True)
        ct = jax.random.normal(jax.random.key(4), (t_len, batch, spec.merged_size(0)))

        def grads(params, xs, cts, grad="bptt", spec=spec, lengths=p.lengths):
            f = lambda a, b: rnn_states(a, spec, b, lengths=lengths, checkpoint_every=every, grad=grad)  # noqa: E731
            return jax.vjp(f, params, xs)[1](cts)

        fn = jax.jit(grads)
        temp = budget.temp_bytes(fn.lower(p.params, p.xs, ct).compile())
        assert temp < bound, (cell, temp, bound)
        assert ref.max_rel_err(fn(p.params, p.xs, ct), grads(p.params, p.xs, ct, "autodiff")) < 1e-4


class SequenceLayerTest(chex.TestCase):
    """``core.sequence.layer_states`` (the one-sequence custom VJP of the Equinox layer: the reverse
    recurrence alone, the weight matmuls left to jax.grad): for drawn one-layer networks of every
    cell, with lengths (0 and T among them) and h0, the gradients of params, xs and h0 of
    sum(h(t) * probe) + sum(tanh(final state)) equal ``rnn_states(grad="autodiff")``'s (float64,
    1e-10; float32: both judged against float64), called on the batch and vmapped over its
    sequences."""

    @staticmethod
    def _grads(p, how):
        """The gradients of the score in p's dtype: how = "autodiff", "batch" or "vmapped"."""
        from bptt_jax.core import checks, forward, sequence
        from bptt_jax.core.vjp import rnn_states

        t_len, batch = p.xs.shape[:2]
        dtype = p.xs.dtype
        h0 = p.h0 if p.h0 is not None else ref.zero_h0(p.spec, batch, dtype)
        probe = jnp.cos(jnp.arange(t_len * batch * p.spec.hidden_sizes[0], dtype=dtype)).reshape(t_len, batch, -1)
        score = lambda hs, last: jnp.sum(hs * probe) + sum(jnp.sum(jnp.tanh(a)) for a in jax.tree.leaves(last))  # noqa: E731

        def theirs(params, xs, h0):
            hs, last = rnn_states(params, p.spec, xs, h0=h0, lengths=p.lengths, return_last=True, grad="autodiff")
            return score(hs, last)

        def ours(params, xs, h0):
            _, h_in, lengths = checks.check_inputs(params, p.spec, xs, h0, p.lengths)
            layer = params.layers[0]

            def one(x, h, valid):  # x [T, B', N], h [B', W], valid [T, B'] or None
                return sequence.layer_states(layer, p.spec.activation, x, h, valid)

            valid = forward.valid_mask(lengths, t_len)
            if how == "batch":
                hs, last = one(xs, h_in[0], valid)
            else:  # each sequence alone, as jax.vmap over the Equinox layer runs it
                v_ax = None if valid is None else 1
                run = jax.vmap(
                    lambda x, h, v: one(x[:, None], h[None], None if v is None else v[:, None]), (1, 0, v_ax)
                )
                hs, last = run(xs, h_in[0], valid)
                hs, last = jnp.moveaxis(hs[:, :, 0], 0, 1), last[:, 0]
            return score(hs, p.spec.public_states((last,)))

        return jax.jit(jax.grad(theirs if how == "autodiff" else ours, argnums=(0, 1, 2)))(p.params, p.xs, h0)

    @chex.variants(with_jit=True)
    @settings(max_examples=6)
    @given(problem=ref.problems(max_t=8, max_layers=1, bidirectional=False, cells=CELLS))
    def test_layer_states_equal_autodiff_float64(self, problem):
        with jax.enable_x64(True):
            p = ref.cast(problem, jnp.float64)
            want = self._grads(p, "autodiff")
            for how in ("batch", "vmapped"):
                got = self.variant(lambda h=how: self._grads(p, h))()
                self.assertLess(ref.max_rel_err(got, want), 1e-10, how)

    @chex.variants(with_jit=True)
    @settings(max_examples=4)
    @given(problem=ref.problems(max_t=8, max_layers=1, bidirectional=False, cells=CELLS))
    def test_layer_states_as_accurate_as_autodiff_float32(self, problem):
        """float32: ours and autodiff's both judged against float64's gradient: ours within 1.5x
        autodiff's error, plus 1e-5."""
        p = ref.cast(problem, jnp.float32)
        theirs = self._grads(p, "autodiff")
        with jax.enable_x64(True):
            truth = self._grads(ref.cast(problem, jnp.float64), "autodiff")
            e_theirs = ref.max_rel_err(theirs, truth)
        for how in ("batch", "vmapped"):
            got = self.variant(lambda h=how: self._grads(p, h))()
            with jax.enable_x64(True):
                e_ours = ref.max_rel_err(got, truth)
            self.assertLess(e_ours, 1.5 * e_theirs + 1e-5, (how, e_ours, e_theirs))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize(
    "cell, bidirectional, every",
    [("gru", False, 64), ("gru", False, (64, 16)), ("lstm", True, (6, 3)), ("elman", True, (6, 3))],
)
def test_segments_keep_gates_and_nest_at_named_shapes(cell, bidirectional, every, dtype):
    """Named cases the drawn ones may miss: the GRU's segments past the rule's 2^16 cached elements
    (64 steps x B 8 x 3 x N1 48), where a segment keeps its gates for its BPTT (asserted), one level
    and nested; bidirectional nested segments of the LSTM and the Elman cell in float32 too. DIV and
    the gradients equal jax.value_and_grad's (float64 1e-10, float32 1e-5), dxs and h_last the plain
    BPTT's."""
    from bptt_jax.core import plan

    t_len, batch, n1 = (128, 8, 48) if cell == "gru" else (12, 3, 4)
    spec = bj.RNNSpec(3, (n1,), 4, cell=cell, bidirectional=bidirectional)
    k = plan.segment_levels(every)[-1]
    assert plan.resolve_gates("auto", spec, k, batch, None, dtype) == (cell != "elman" and (cell == "lstm" or k == 64))
    with jax.enable_x64(dtype == jnp.float64):
        p = ref.make_problem(spec, t_len, batch, seed=3, use_lengths=True, dtype=dtype)
        kw = dict(lengths=p.lengths, with_dxs=True)
        got = bj.bptt(p.params, spec, p.xs, p.targets, checkpoint_every=every, **kw)
        plain = bj.bptt(p.params, spec, p.xs, p.targets, **kw)
        value, grads = jax.value_and_grad(lambda a: bj.loss(a, spec, p.xs, p.targets, lengths=p.lengths))(p.params)
        tol = 1e-10 if dtype == jnp.float64 else 1e-5
        assert ref.max_rel_err((got[0], got[1]), (value, grads)) < tol
        assert ref.max_rel_err((got[2].dxs, got[2].h_last), (plain[2].dxs, plain[2].h_last)) < tol
