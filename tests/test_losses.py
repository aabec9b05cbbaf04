import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.core import activations, losses
from tests.reference import VALID_PAIRS


@pytest.mark.parametrize("out_act,div", VALID_PAIRS)
@pytest.mark.parametrize("generic", [False, True])
def test_output_grad_equals_autodiff(out_act, div, generic):
    rng = np.random.RandomState(0)
    z2s = jnp.asarray(rng.randn(3, 2, 4))
    if div == "cross_entropy":
        targets = jnp.asarray(rng.randint(0, 4, (3, 2)))
    elif div == "binary_cross_entropy":
        targets = jnp.asarray(rng.rand(3, 2, 4))
    else:
        targets = jnp.asarray(rng.randn(3, 2, 4))
    w = jnp.asarray(rng.rand(3, 2))

    def total(z):
        return losses.total(losses.divergence(div, z, activations.output(out_act, z), targets), w)

    with jax.enable_x64(True):
        z = z2s.astype(jnp.float64)
        got = losses.output_grad(
            div, out_act, z, activations.output(out_act, z), targets, w.astype(jnp.float64), generic=generic
        )
        np.testing.assert_allclose(got, jax.grad(total)(z), rtol=1e-12, atol=1e-14)


def test_divergences_match_their_formulas():
    z = jnp.array([[[0.2, -0.3, 1.0]]])
    y = jax.nn.softmax(z)
    np.testing.assert_allclose(
        losses.divergence("cross_entropy", z, y, jnp.array([[2]])), -jnp.log(y[..., 2]), rtol=1e-6
    )
    d = jnp.array([[[0.2, 0.5, 0.3]]])
    np.testing.assert_allclose(losses.divergence("cross_entropy", z, y, d), -(d * jnp.log(y)).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(losses.divergence("squared_error", z, z, d), ((z - d) ** 2).sum(-1), rtol=1e-6)
    s = jax.nn.sigmoid(z)
    want = -(d * jnp.log(s) + (1 - d) * jnp.log(1 - s)).sum(-1)
    np.testing.assert_allclose(losses.divergence("binary_cross_entropy", z, s, d), want, rtol=1e-6)


def test_cross_entropy_is_finite_for_huge_logits():
    z = jnp.array([[[1000.0, -1000.0]]])
    val = losses.divergence("cross_entropy", z, jax.nn.softmax(z), jnp.array([[1]]))
    np.testing.assert_allclose(val, 2000.0)


def test_effective_weights_zero_past_lengths():
    w = losses.effective_weights(None, jnp.array([2, 0, 3]), 3, 3, jnp.float32)
    np.testing.assert_array_equal(w, [[1, 0, 1], [1, 0, 1], [0, 0, 1]])
