import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.core import activations


@pytest.mark.parametrize("name", sorted(activations.HIDDEN_ACTIVATIONS))
def test_derivative_from_output_equals_autodiff(name):
    act = activations.hidden(name)
    z = jnp.linspace(-3.0, 3.0, 41) + 0.013  # avoid relu's kink at exactly 0
    want = jax.vmap(jax.grad(act.f))(z)
    np.testing.assert_allclose(act.df_from_h(act.f(z)), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", activations.OUTPUT_ACTIVATIONS)
def test_output_jacobian_equals_jacfwd(name):
    z = jnp.array([[0.3, -1.2, 0.5, 2.0], [0.0, 0.1, -0.4, 1.0]])
    y = activations.output(name, z)
    jac = activations.output_jacobian(name, y)
    want = jax.vmap(jax.jacfwd(lambda v: activations.output(name, v)))(z)  # [B, M, M], [i, j] = dY_i/dZ_j
    if activations.is_vector(name):
        assert jac.shape == (2, 4, 4)
        np.testing.assert_allclose(jac, want, rtol=1e-6, atol=1e-7)
    else:
        assert jac.shape == (2, 4)  # the diagonal of a diagonal Jacobian
        np.testing.assert_allclose(jac, jnp.diagonal(want, axis1=-2, axis2=-1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(want - jax.vmap(jnp.diag)(jac), 0.0, atol=1e-7)


@pytest.mark.parametrize("name", activations.OUTPUT_ACTIVATIONS)
@pytest.mark.parametrize("materialize", [False, True])
def test_output_vjp_equals_jax_vjp(name, materialize):
    z = jnp.array([[0.3, -1.2, 0.5], [0.7, 0.1, -0.4]])
    dy = jnp.array([[1.0, -2.0, 0.5], [0.2, 0.3, -0.1]])
    y, pullback = jax.vjp(lambda v: activations.output(name, v), z)
    np.testing.assert_allclose(
        activations.output_vjp(name, y, dy, materialize=materialize), pullback(dy)[0], rtol=1e-6, atol=1e-7
    )


def test_unknown_names():
    with pytest.raises(
        ValueError, match=r"activation: unknown name 'gelu'; allowed: \['identity', 'relu', 'sigmoid', 'tanh'\]"
    ):
        activations.hidden("gelu")
    with pytest.raises(ValueError, match="output_activation: unknown name 'relu'"):
        activations.output("relu", jnp.zeros(2))
