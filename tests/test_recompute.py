"""BPTT with segment recomputation (checkpoint_every=k) equals the plain BPTT and jax.grad."""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bptt_jax as bj
from tests import reference as ref


@given(problem=ref.problems(bidirectional=False, max_t=9), every=st.integers(1, 10))
def test_segments_equal_plain_bptt_float64(problem, every):
    with jax.enable_x64(True):
        p = ref.cast(problem, jnp.float64)
        kw = dict(weights=p.weights, lengths=p.lengths, h0=p.h0)
        plain = bj.bptt(p.params, p.spec, p.xs, p.targets, **kw)
        seg = bj.bptt(p.params, p.spec, p.xs, p.targets, checkpoint_every=every, **kw)
        assert ref.max_rel_err(seg, plain) < 1e-10
        auto = jax.grad(lambda q: bj.loss(q, p.spec, p.xs, p.targets, **kw))(p.params)
        assert ref.max_rel_err(seg[1], auto) < 1e-10


def test_diagnostics_off_gives_same_gradients():
    spec = bj.RNNSpec(3, (4,), 5)
    p = ref.make_problem(spec, 6, 2, seed=0)
    a = bj.bptt(p.params, spec, p.xs, p.targets)
    b = bj.bptt(p.params, spec, p.xs, p.targets, diagnostics=False)
    assert b[2].dxs is None and b[2].dh_norms is None
    assert ref.max_rel_err(b[:2], a[:2]) < 1e-6


def test_segment_errors():
    spec = bj.RNNSpec(3, (4,), 5, bidirectional=True)
    p = ref.make_problem(spec, 6, 2, seed=0)
    with pytest.raises(ValueError, match=r"checkpoint_every: segment recomputation needs a unidirectional network"):
        bj.bptt(p.params, spec, p.xs, p.targets, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"checkpoint_every: expected a positive int or None, got 0"):
        bj.bptt(p.params, spec, p.xs, p.targets, checkpoint_every=0)
