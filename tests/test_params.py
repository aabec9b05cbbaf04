import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax.core.params import check_params


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hidden_sizes=()), r"RNNSpec.hidden_sizes: must hold at least one layer size, got \(\)"),
        (dict(hidden_sizes=(4, 0)), r"RNNSpec.hidden_sizes\[1\]: expected a positive int, got 0"),
        (dict(input_size=-1), r"RNNSpec.input_size: expected a positive int, got -1"),
        (dict(output_size=2.5), r"RNNSpec.output_size: expected a positive int, got 2.5"),
        (
            dict(activation="gelu"),
            r"RNNSpec.activation: unknown value 'gelu'; allowed: \['identity', 'relu', 'sigmoid', 'tanh'\]",
        ),
        (
            dict(output_activation="relu"),
            r"RNNSpec.output_activation: unknown value 'relu'; allowed: \['softmax', 'tanh', 'sigmoid', 'identity'\]",
        ),
        (
            dict(divergence="kl"),
            r"RNNSpec.divergence: unknown value 'kl'; allowed: \['cross_entropy', 'squared_error', 'binary_cross_entropy'\]",
        ),
        (dict(merge="mean"), r"RNNSpec.merge: unknown value 'mean'; allowed: \['concat', 'sum'\]"),
        (
            dict(output_activation="tanh"),
            r"RNNSpec.divergence: 'cross_entropy' needs output_activation='softmax', got output_activation='tanh'",
        ),
        (
            dict(output_activation="identity", divergence="binary_cross_entropy"),
            r"RNNSpec.divergence: 'binary_cross_entropy' needs output_activation='sigmoid', got output_activation='identity'",
        ),
    ],
)
def test_invalid_spec_messages(kwargs, message):
    base = dict(input_size=3, hidden_sizes=(4,), output_size=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        bj.RNNSpec(**base)


def test_spec_is_hashable_and_lists_become_tuples():
    a = bj.RNNSpec(3, [4, 5], 2)
    b = bj.RNNSpec(3, (4, 5), 2)
    assert a == b and hash(a) == hash(b) and a.hidden_sizes == (4, 5)


@pytest.mark.parametrize("bidirectional,merge", [(False, "concat"), (True, "concat"), (True, "sum")])
@pytest.mark.parametrize("scheme", ["uniform", "orthogonal", "identity", "normal"])
def test_init_shapes(bidirectional, merge, scheme):
    spec = bj.RNNSpec(3, (4, 5), 2, bidirectional=bidirectional, merge=merge)
    params = bj.init_params(jax.random.key(0), spec, scheme=scheme)
    check_params(params, spec)
    d = 2 if bidirectional and merge == "concat" else 1
    assert params.layers[1].w1.shape == (4 * d, 5)
    assert params.readout.w2.shape == (5 * d, 2)
    assert len(params.reverse_layers) == (2 if bidirectional else 0)


def test_init_schemes_values():
    spec = bj.RNNSpec(3, (6,), 2, activation="relu")
    p = bj.init_params(jax.random.key(1), spec, scheme="uniform")
    assert float(jnp.abs(p.layers[0].w11).max()) <= 1 / np.sqrt(6)
    p = bj.init_params(jax.random.key(1), spec, scheme="orthogonal")
    np.testing.assert_allclose(p.layers[0].w11 @ p.layers[0].w11.T, np.eye(6), atol=1e-5)
    p = bj.init_params(jax.random.key(1), spec, scheme="identity", scale=0.5)
    np.testing.assert_array_equal(p.layers[0].w11, 0.5 * np.eye(6))
    np.testing.assert_array_equal(p.layers[0].b1, 0.0)
    with pytest.raises(ValueError, match=r"scheme: unknown value 'xavier'"):
        bj.init_params(jax.random.key(1), spec, scheme="xavier")


def test_check_params_names_the_bad_array():
    spec = bj.RNNSpec(3, (4,), 2)
    p = bj.init_params(jax.random.key(0), spec)
    bad = p._replace(readout=p.readout._replace(w2=jnp.zeros((5, 2))))
    with pytest.raises(ValueError, match=r"params.readout.w2: expected shape \(4, 2\), got \(5, 2\)"):
        check_params(bad, spec)
    other = bj.RNNSpec(3, (4, 4), 2)
    with pytest.raises(ValueError, match=r"params.layers: expected 2 layers"):
        check_params(p, other)
