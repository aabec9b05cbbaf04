"""Every bad input gets its message, before XLA sees it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj

SPEC = bj.RNNSpec(3, (4,), 5)
PARAMS = bj.init_params(jax.random.key(0), SPEC)
XS = jnp.zeros((6, 2, 3))
TARGETS = jnp.zeros((6, 2), jnp.int32)


def _bptt(**kw):
    args = dict(params=PARAMS, spec=SPEC, xs=XS, targets=TARGETS)
    args.update(kw)
    return bj.bptt(args.pop("params"), args.pop("spec"), args.pop("xs"), args.pop("targets"), **args)


@pytest.mark.parametrize(
    "kw,exc,message",
    [
        (dict(xs=jnp.zeros((6, 3))), ValueError, r"xs: expected rank 3 \[T, B, N\] \(time-major\), got shape \(6, 3\)"),
        (
            dict(xs=jnp.zeros((6, 2, 7))),
            ValueError,
            r"xs: expected feature size N=3 \(spec.input_size\), got shape \(6, 2, 7\)",
        ),
        (
            dict(xs=jnp.zeros((0, 2, 3)), targets=jnp.zeros((0, 2), jnp.int32)),
            ValueError,
            r"xs: expected T >= 1 and B >= 1, got shape \(0, 2, 3\)",
        ),
        (
            dict(xs=jnp.zeros((6, 0, 3)), targets=jnp.zeros((6, 0), jnp.int32)),
            ValueError,
            r"xs: expected T >= 1 and B >= 1, got shape \(6, 0, 3\)",
        ),
        (  # host (NumPy) targets are range-checked before the trace: an empty batch must still be named
            dict(xs=np.zeros((0, 2, 3), np.float32), targets=np.zeros((0, 2), np.int32)),
            ValueError,
            r"xs: expected T >= 1 and B >= 1, got shape \(0, 2, 3\)",
        ),
        (
            dict(xs=jnp.zeros((6, 2, 3), jnp.int32)),
            TypeError,
            r"xs: expected a floating dtype \(float32 or float64\), got int32",
        ),
        (
            dict(targets=jnp.zeros((6, 3), jnp.int32)),
            ValueError,
            r"targets: expected integer class indices of shape \(6, 2\) = \[T, B\], got \(6, 3\)",
        ),
        (
            dict(targets=np.full((6, 2), 5, np.int32)),
            ValueError,
            r"targets: class indices must lie in \[0, M=5\), got min 5 and max 5",
        ),
        (
            dict(targets=jnp.full((6, 2), 5, jnp.int32), check_values=True),
            ValueError,
            r"targets: class indices must lie in \[0, M=5\), got min 5 and max 5",
        ),
        (
            dict(targets=jnp.zeros((6, 2, 4))),
            ValueError,
            r"targets: expected shape \(6, 2, 5\) = \[T, B, M\], got \(6, 2, 4\)",
        ),
        (dict(lengths=np.array([7, 2])), ValueError, r"lengths: expected values in \[0, T=6\], got min 2 and max 7"),
        (dict(lengths=[-1, 2]), ValueError, r"lengths: expected values in \[0, T=6\], got min -1 and max 2"),
        (
            dict(lengths=jnp.array([7, 2]), check_values=True),
            ValueError,
            r"lengths: expected values in \[0, T=6\], got min 2 and max 7",
        ),
        (dict(lengths=jnp.array([1, 2, 3])), ValueError, r"lengths: expected shape \(2,\) = \[B\], got \(3,\)"),
        (dict(lengths=jnp.array([1.0, 2.0])), TypeError, r"lengths: expected an integer dtype, got float32"),
        (dict(weights=jnp.ones((6,))), ValueError, r"weights: expected shape \(6, 2\) = \[T, B\], got \(6,\)"),
        (dict(h0=(jnp.zeros((2, 5)),)), ValueError, r"h0\[0\]: expected shape \(2, 4\) = \[B, N1\], got \(2, 5\)"),
        (dict(h0=(jnp.zeros((2, 4)),) * 2), ValueError, r"h0: expected 1 entries \(layers=1 x directions=1\), got 2"),
        (
            dict(params=bj.init_params(jax.random.key(0), bj.RNNSpec(3, (6,), 5))),
            ValueError,
            r"params.layers\[0\].w1: expected shape \(3, 4\), got \(3, 6\)",
        ),
        (dict(params={"w": 1}), ValueError, r"params: expected an RNNParams, got dict"),
        (dict(block_size=0), ValueError, r"block_size: expected a positive int or None, got 0"),
    ],
)
def test_bad_input_messages(kw, exc, message):
    with pytest.raises(exc, match=message):
        _bptt(**kw)


def test_bad_input_caught_for_loss_and_forward_too():
    with pytest.raises(ValueError, match=r"xs: expected rank 3"):
        bj.loss(PARAMS, SPEC, jnp.zeros((6, 3)), TARGETS)
    with pytest.raises(ValueError, match=r"xs: expected rank 3"):
        bj.forward(PARAMS, SPEC, jnp.zeros((6, 3)))


def test_nan_propagates_unless_check_finite():
    xs = XS.at[2, 1, 0].set(jnp.nan)
    value, grads, _ = _bptt(xs=xs)
    assert np.isnan(float(value))
    with pytest.raises(ValueError, match=r"xs: holds NaN or inf \(check_finite=True\)"):
        _bptt(xs=xs, check_finite=True)
    bad = PARAMS._replace(readout=PARAMS.readout._replace(b2=PARAMS.readout.b2.at[0].set(jnp.inf)))
    with pytest.raises(ValueError, match=r"params.*holds NaN or inf"):
        _bptt(params=bad, check_finite=True)


def test_shape_checks_still_run_under_jit():
    f = jax.jit(lambda xs: bj.loss(PARAMS, SPEC, xs, TARGETS))
    with pytest.raises(ValueError, match=r"xs: expected feature size N=3"):
        f(jnp.zeros((6, 2, 2)))


@pytest.mark.parametrize(
    "kw",
    [dict(targets=jnp.full((6, 2), 5, jnp.int32)), dict(lengths=jnp.array([7, 2])), dict(lengths=jnp.array([-1, 2]))],
)
def test_device_values_out_of_range_give_nan_not_a_wrong_number(kw):
    """Device arrays are not read back by default; the in-graph check makes DIV and grads NaN."""
    value, grads, _ = _bptt(**kw)
    assert np.isnan(float(value))
    assert all(np.isnan(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.isnan(float(bj.loss(PARAMS, SPEC, XS, kw.get("targets", TARGETS), lengths=kw.get("lengths"))))
    # ... and the same values within range give finite numbers (the check can fail both ways).
    ok = _bptt(targets=jnp.full((6, 2), 4, jnp.int32), lengths=jnp.array([6, 0]))
    assert np.isfinite(float(ok[0]))


def test_value_checks_off():
    """check_values=False reads nothing on the host: host arrays out of range then give NaN too."""
    value, _, _ = _bptt(targets=np.full((6, 2), 5, np.int32), check_values=False)
    assert np.isnan(float(value))


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_float32_inputs_with_float64_parameters_are_promoted(cell):
    # The recurrence computes in the promotion of the inputs' and parameters' dtypes (float64 here);
    # the explicit BPTT equals jax.grad of the loss, and the gradients have the parameters' dtype.
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (4,), 5, cell=cell, bidirectional=cell == "gru")
        params = bj.init_params(jax.random.key(0), spec, dtype=jnp.float64)
        xs = jax.random.normal(jax.random.key(1), (6, 2, 3), jnp.float32)
        targets = jnp.asarray([[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 0]], jnp.int32)
        lengths = jnp.array([6, 4])
        value, grads, _ = bj.bptt(params, spec, xs, targets, lengths=lengths)
        want = jax.grad(bj.loss)(params, spec, xs, targets, lengths=lengths)
        assert value.dtype == jnp.float64
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
