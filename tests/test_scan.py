import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import forward
from tests import reference as ref


class ForwardEqualsLoopTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(problem=ref.problems())
    def test_forward_equals_python_loop(self, problem):
        p = problem
        h0 = p.h0 or tuple(jnp.zeros((p.xs.shape[1], n1)) for n1 in p.spec.state_sizes())
        out = self.variant(lambda params, xs, h0, lengths: bj.forward(params, p.spec, xs, h0=h0, lengths=lengths))(
            p.params, p.xs, h0, p.lengths
        )
        ys, hs = ref.loop_forward(p.params, p.spec, p.xs, h0, p.lengths)
        np.testing.assert_allclose(out.ys, ys, rtol=1e-5, atol=1e-6)
        for a, b in zip(out.hs, hs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@given(t_len=st.integers(1, 6), lens=st.lists(st.integers(0, 6), min_size=1, max_size=4))
def test_reverse_padded_flips_prefix_and_is_its_own_inverse(t_len, lens):
    lengths = ref.on_device([min(n, t_len) for n in lens], jnp.int32)
    xs = jnp.arange(t_len * len(lens) * 2, dtype=jnp.float32).reshape(t_len, len(lens), 2)
    out = bj.reverse_padded(xs, lengths)
    o, x = np.asarray(out), np.asarray(xs)  # sliced on the host: no XLA program per slice and shape
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_array_equal(o[:n, b], x[:n, b][::-1])
        np.testing.assert_array_equal(o[n:, b], x[n:, b])
    np.testing.assert_array_equal(bj.reverse_padded(out, lengths), xs)
    np.testing.assert_array_equal(bj.reverse_padded(xs, None), xs[::-1])


def test_final_states_and_length_zero():
    spec = bj.RNNSpec(2, (3,), 2, bidirectional=True)
    p = ref.make_problem(spec, 5, 3, seed=2, use_h0=True)
    lengths = jnp.array([5, 2, 0])
    out = bj.forward(p.params, spec, p.xs, h0=p.h0, lengths=lengths)
    # forward net: state at the last valid step; reverse net: its state at input time t = 0.
    np.testing.assert_allclose(out.h_last[0][0], out.hs[0][4, 0])
    np.testing.assert_allclose(out.h_last[0][1], out.hs[0][1, 1])
    np.testing.assert_allclose(out.h_last[1][1], out.hs[1][0, 1])
    np.testing.assert_allclose(out.h_last[0][2], p.h0[0][2])  # length 0 gives h0
    np.testing.assert_allclose(out.h_last[1][2], p.h0[1][2])


def test_backward_net_equals_forward_net_on_reversed_input():
    """A bidirectional layer's reverse net is the forward scan on reverse_padded input."""
    spec = bj.RNNSpec(2, (3,), 2, bidirectional=True)
    p = ref.make_problem(spec, 6, 2, seed=9)
    lengths = jnp.array([6, 4])
    out = bj.forward(p.params, spec, p.xs, lengths=lengths)
    uni = bj.RNNSpec(2, (3,), 2)
    params_r = bj.RNNParams(
        (p.params.reverse_layers[0],), (), bj.ReadoutParams(p.params.readout.w2[3:], p.params.readout.b2)
    )
    rev = bj.forward(params_r, uni, bj.reverse_padded(p.xs, lengths), lengths=lengths)
    np.testing.assert_allclose(out.hs[1], bj.reverse_padded(rev.hs[0], lengths), rtol=1e-6)


def test_t1_equals_feed_forward_net():
    spec = bj.RNNSpec(3, (4,), 2)
    p = ref.make_problem(spec, 1, 2, seed=0)
    out = bj.forward(p.params, spec, p.xs)
    layer = p.params.layers[0]
    h = jnp.tanh(p.xs[0] @ layer.w1 + layer.b1)
    np.testing.assert_allclose(out.ys[0], jax.nn.softmax(h @ p.params.readout.w2 + p.params.readout.b2), rtol=1e-6)


def test_unroll_does_not_change_results():
    spec = bj.RNNSpec(3, (4,), 2)
    p = ref.make_problem(spec, 9, 2, seed=0)
    a = bj.forward(p.params, spec, p.xs).ys
    b = bj.forward(p.params, spec, p.xs, unroll=4).ys
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_unroll_auto_by_backend_and_bad_values():
    """unroll=None ("auto", the default) is 1 on a CPU and forward.GPU_UNROLL on a GPU (measured on an
    H100, benchmarks/README.md); anything but a positive int or None is a named error."""
    assert forward.resolve_unroll(None, backend="cpu") == 1
    assert forward.resolve_unroll(None, backend="gpu") == forward.GPU_UNROLL == 8
    assert forward.resolve_unroll(3, backend="gpu") == 3
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match=r"unroll: expected a positive int or None"):
            forward.resolve_unroll(bad)
    spec = bj.RNNSpec(3, (4,), 5)
    p = ref.make_problem(spec, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"unroll: expected a positive int or None"):
        bj.bptt(p.params, spec, p.xs, p.targets, unroll=0)


def test_auto_block_size_by_backend():
    """On a GPU the whole sequence is one block up to GPU_WHOLE_ELEMENTS (measured faster there); the
    CPU keeps its cache-sized blocks."""
    from bptt_jax.core.plan import auto_block_size

    assert auto_block_size(1000, 64, 256, backend="cpu") < 1000
    assert auto_block_size(1000, 64, 256, backend="gpu") == 1000  # 2^24 elements
    c = auto_block_size(100000, 64, 256, backend="gpu")
    assert 1 <= c < 100000 and c * 64 * 256 <= 2 * 2**23


def test_half_precision_block_is_halved_before_it_moves_to_a_divisor():
    """A 16-bit compute dtype halves the float32 block, then looks for a divisor of T: at T = 100,
    B = 64, width 512 float32's 8 moves up to 10, while the 16-bit block is 4 (half of 8), not 5
    (half of 10); a whole-sequence float32 block becomes a tenth of T on the CPU (a quarter below
    plan.HALF_TENTH_ELEMENTS elements and on a GPU); every block divides T here; the plan of a
    bfloat16 spec takes it."""
    from bptt_jax.core import plan

    assert plan.auto_block_size(100, 64, 512, backend="cpu") == 10
    assert plan.auto_block_size(100, 64, 512, backend="cpu", half=True) == 4
    assert plan.auto_block_size(100, 32, 128, backend="cpu") == 100  # T B width <= WHOLE_ELEMENTS
    assert plan.auto_block_size(100, 32, 128, backend="cpu", half=True) == 10  # 409,600 elements
    assert plan.auto_block_size(100, 4, 128, backend="cpu", half=True) == 25  # 51,200: a quarter
    assert plan.auto_block_size(50, 1, 64, backend="cpu", half=True) == 10  # 3,200: a quarter, 12 -> 10
    assert plan.auto_block_size(100, 32, 128, backend="gpu", half=True) == 25  # on a GPU: a quarter
    for t, b, w in [(200, 64, 256), (1000, 16, 384), (1000, 16, 128), (50, 1, 64)]:
        full, half = (
            plan.auto_block_size(t, b, w, backend="cpu"),
            plan.auto_block_size(t, b, w, backend="cpu", half=True),
        )
        assert half <= full and t % half == 0, (t, b, w, full, half)
    spec = bj.RNNSpec(256, (512,), 256, compute_dtype="bfloat16")
    if jax.default_backend() == "cpu":
        assert plan.resolve(plan.Options(), spec, 100, 64, jnp.bfloat16, use_cache=False).block == 4
