import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax.layers.torch import expected_torch_shapes, from_torch_state_dict, to_torch_state_dict
from tests import reference as ref


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_round_trip(bidirectional, activation):
    spec = bj.RNNSpec(3, (4, 4, 4), 2, activation=activation, bidirectional=bidirectional)
    params = bj.init_params(jax.random.key(0), spec)
    state = to_torch_state_dict(params, spec)
    assert list(state) == list(expected_torch_shapes(spec))
    assert state["rnn.weight_ih_l1"].shape == (4, 4 * (2 if bidirectional else 1))
    np.testing.assert_array_equal(state["rnn.bias_hh_l0"], 0.0)
    back = from_torch_state_dict(state, spec)
    assert ref.max_rel_err(back, params) == 0.0


def test_biases_are_summed_on_import():
    spec = bj.RNNSpec(2, (3,), 2)
    state = to_torch_state_dict(bj.init_params(jax.random.key(0), spec), spec)
    state["rnn.bias_hh_l0"] = np.ones(3, np.float32)
    p = from_torch_state_dict(state, spec)
    np.testing.assert_allclose(p.layers[0].b1, state["rnn.bias_ih_l0"] + 1.0)


def test_keys_rejected_by_name():
    spec = bj.RNNSpec(2, (3,), 2, bidirectional=True)
    state = to_torch_state_dict(bj.init_params(jax.random.key(0), spec), spec)
    missing = dict(state)
    del missing["rnn.weight_hh_l0_reverse"]
    with pytest.raises(ValueError, match=r"state: missing keys \['rnn.weight_hh_l0_reverse'\]"):
        from_torch_state_dict(missing, spec)
    extra = dict(state, **{"rnn.weight_ih_l1": np.zeros((3, 6))})
    with pytest.raises(ValueError, match=r"state: unexpected keys \['rnn.weight_ih_l1'\]"):
        from_torch_state_dict(extra, spec)
    bad = dict(state, **{"readout.weight": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"state\['readout.weight'\]: expected shape \(2, 6\), got \(2, 3\)"):
        from_torch_state_dict(bad, spec)


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            bj.RNNSpec(2, (3,), 2, activation="sigmoid"),
            r"spec.activation: torch.nn.RNN supports nonlinearity 'tanh' or 'relu', got 'sigmoid'",
        ),
        (
            bj.RNNSpec(2, (3, 4), 2),
            r"spec.hidden_sizes: torch.nn.RNN needs the same hidden size in every layer, got \(3, 4\)",
        ),
        (
            bj.RNNSpec(2, (3,), 2, bidirectional=True, merge="sum"),
            r"spec.merge: torch.nn.RNN concatenates the two directions",
        ),
    ],
)
def test_unexportable_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        to_torch_state_dict(bj.init_params(jax.random.key(0), spec), spec)


def test_outputs_match_torch_if_installed():
    """Optional cross-check: same weights in torch.nn.RNN + Linear give the same outputs."""
    torch = pytest.importorskip("torch")
    spec = bj.RNNSpec(3, (4, 4), 2, output_activation="identity", divergence="squared_error", bidirectional=True)
    params = bj.init_params(jax.random.key(0), spec)
    model = torch.nn.ModuleDict(
        {"rnn": torch.nn.RNN(3, 4, num_layers=2, bidirectional=True), "readout": torch.nn.Linear(8, 2)}
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch_state_dict(params, spec).items()})
    xs = np.random.RandomState(0).randn(5, 2, 3).astype(np.float32)
    with torch.no_grad():
        out, _ = model["rnn"](torch.from_numpy(xs))
        want = model["readout"](out).numpy()
    np.testing.assert_allclose(bj.forward(params, spec, jnp.asarray(xs)).ys, want, rtol=1e-4, atol=1e-5)
