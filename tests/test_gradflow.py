"""The gradient-flow picture: exact geometric rates for linear nets, the command, its refusals, labels."""

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import matplotlib.figure
import numpy as np
import pytest
from hypothesis import assume, given, settings

from bptt_jax.command import cli, data, gradflow, report, runner
from bptt_jax.command.config import load_config
from bptt_jax.core.gradient import bptt
from bptt_jax.core.gradient import loss as bptt_loss
from bptt_jax.core.params import RNNSpec, init_params
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_sizes=[6]",
    "data.adding_length=12",
    "data.batch_size=4",
    "data.test_size=4",
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=1",
    "train.checkpoint_every=1",
    "train.time_limit_s=0",
    "output.plots=false",
]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rho", [0.5, 1.1])
def test_linear_network_rate_is_rho(rho, bidirectional):
    # f1 = identity and W11 = rho Q (Q orthogonal): dDIV/dh(t) = dDIV/dh(t+1) W11^T, so every
    # sequence's norm is multiplied by exactly rho per step, and so is the batch mean.
    spec = RNNSpec(
        2,
        (5,),
        1,
        activation="identity",
        output_activation="identity",
        divergence="squared_error",
        bidirectional=bidirectional,
    )
    params = init_params(jax.random.key(3), spec, scheme="orthogonal", scale=rho)
    batch = data.adding_batch(np.random.default_rng(0), 15, 3)
    profile = gradflow.gradient_flow(params, spec, batch)
    assert list(profile) == list(spec.state_labels())
    for label, norms in profile.items():
        ratios = norms[2:] / norms[1:-1]
        np.testing.assert_allclose(ratios, rho, rtol=2e-5, err_msg=label)
        rate, span = gradflow.fit_rate(norms)
        assert span == (1, 14)
        assert gradflow.spectral_radius(params.layers[0].w11) == pytest.approx(rho, rel=1e-5)
        assert rate == pytest.approx(rho, rel=2e-5)


def test_profile_is_dh_norms_read_from_the_loss_step():
    # The forward line at distance k is dh_norms at t = T-1-k for a loss on the last step only,
    # which is the adding task's own weighting; cross-checked against jax.grad with an additive probe.
    spec = RNNSpec(2, (4,), 1, activation="tanh", output_activation="identity", divergence="squared_error")
    params = init_params(jax.random.key(1), spec)
    batch = data.adding_batch(np.random.default_rng(1), 9, 3)
    profile = gradflow.gradient_flow(params, spec, batch)["layer 1 forward"]
    from bptt_jax.core.gradient import loss

    xs = jnp.asarray(batch.xs)

    def with_probe(eps):  # h(t) -> h(t) + eps(t): d loss / d eps(t) = dDIV/dh(t)
        p = params
        w1, w11, b1 = p.layers[0]

        def step(h, inp):
            x, e = inp
            h = jnp.tanh(x @ w1 + h @ w11 + b1) + e
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((3, 4)), (xs, eps))
        y = hs @ p.readout.w2 + p.readout.b2
        return jnp.mean(jnp.sum(batch.weights * jnp.sum((y - batch.targets) ** 2, -1), 0))

    want = jax.grad(with_probe)(jnp.zeros((9, 3, 4)))
    want_norms = np.asarray(jnp.mean(jnp.linalg.norm(want, axis=-1), axis=1))[::-1]
    np.testing.assert_allclose(profile, want_norms, rtol=1e-5)
    # the probe's loss is the library's loss (the same network)
    assert float(with_probe(jnp.zeros((9, 3, 4)))) == pytest.approx(
        float(loss(params, spec, xs, batch.targets, weights=batch.weights)), rel=1e-6
    )


def test_fit_rate_stops_at_underflow():
    norms = np.array([1.0] + [0.1**k for k in range(1, 40)] + [0.0, 0.0])
    rate, span = gradflow.fit_rate(norms)
    assert rate == pytest.approx(0.1, rel=1e-9)
    assert span == (1, 15)  # 1e-15 is the floor
    assert gradflow.fit_rate(np.array([1.0, 0.0, 0.0]))[1] is None


def test_gradflow_command_writes_plot_and_json(tmp_path, capsys):
    config = ROOT / "configs" / "adding_irnn_150.toml"
    out = tmp_path / "gf"
    sets = sum((["--set", s] for s in TINY), [])
    assert cli.main(["gradflow", str(config), *sets, "--out", str(out)]) == 0
    record = json.loads((out / "gradflow.json").read_text())
    assert (out / "gradflow.png").stat().st_size > 0
    assert record["T"] == 12 and record["weights"] == "initialisation"
    (line,) = record["lines"]
    assert line["label"] == "layer 1 forward" and len(line["norms"]) == 12 and line["rate"] > 0
    assert record["w11_spectral_radius"] == {"layer 1 forward": pytest.approx(1.0)}  # W11 = I
    # --from: a run of the same network (trained at another length) is accepted ...
    run_dir = tmp_path / "run"
    runner.run(load_config(config, TINY), run_dir, log=lambda s: None, progress=False)
    capsys.readouterr()
    assert cli.main(["gradflow", str(config), *sets, "--set", "data.adding_length=20", "--from", str(run_dir)]) == 0
    record = json.loads((run_dir / "gradflow" / "gradflow.json").read_text())
    assert record["weights"].endswith("best.ckpt") and record["T"] == 20
    assert cli.main(["gradflow", str(config), *sets, "--from", str(run_dir), "--checkpoint", "last"]) == 0
    assert json.loads((run_dir / "gradflow" / "gradflow.json").read_text())["weights"].endswith("last.ckpt")
    # ... another network or another task is refused, by name, without a traceback
    assert cli.main(["gradflow", str(config), *sets, "--set", "model.hidden_sizes=[7]", "--from", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "trained another network" in err and "hidden_sizes: run [6], config [7]" in err
    text = ROOT / "configs" / "char_lm.toml"
    assert cli.main(["gradflow", str(text), "--set", "model.hidden_sizes=[6]", "--from", str(run_dir)]) == 1
    assert "trained task 'adding'" in capsys.readouterr().err
    assert cli.main(["gradflow", str(config), "--from", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_state_labels_and_dh_norms_plot_legend(tmp_path, monkeypatch):
    spec = RNNSpec(3, (4, 5), 2, bidirectional=True)
    assert spec.state_labels() == ("layer 1 forward", "layer 1 reverse", "layer 2 forward", "layer 2 reverse")
    assert RNNSpec(3, (4,), 2).state_labels() == ("layer 1 forward",)
    legends = []
    original = matplotlib.figure.Figure.savefig

    def capture(fig, path, *a, **k):
        legends.append((Path(path).name, fig.axes[0].get_legend_handles_labels()[1]))
        return original(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    rows = [{"step": 1, "loss": 0.5}]
    task = data.make_task(load_config(ROOT / "configs" / "adding_irnn_150.toml", TINY).data, 0, False)
    report.plot(tmp_path, rows, np.ones((6, 4)), task, spec.state_labels())
    assert ("dh_norms.png", list(spec.state_labels())) in legends


def test_stop_below_ends_the_run_at_the_first_evaluation_under_it(tmp_path):
    cfg = load_config(ROOT / "configs" / "adding_irnn_150.toml", TINY + ["train.steps=5", "train.stop_below=1e9"])
    summary = runner.run(cfg, tmp_path / "run", log=lambda s: None, progress=False)
    assert summary["stopped_by"] == "stop_below" and summary["steps"] == 1
    cfg = load_config(ROOT / "configs" / "adding_irnn_150.toml", TINY + ["train.steps=3", "train.stop_below=1e-12"])
    assert runner.run(cfg, tmp_path / "run2", log=lambda s: None, progress=False)["steps"] == 3


def _probe_loss(problem, w, eps):
    """DIV of ``problem``'s network with loss weights ``w``, by Python loops, with eps[j] [T, B, N1]
    added to state j (order layer * D + direction) at each input time t after the cell: the
    gradient with respect to eps[j][t] is dDIV/dh(t) of that state."""
    from bptt_jax.core import activations, losses
    from bptt_jax.core.cells import elman as cell

    spec, params, xs = problem.spec, problem.params, problem.xs
    t_len, batch = xs.shape[:2]
    d = spec.num_directions

    def run(layer, inputs, probe):
        h = jnp.zeros((batch, layer.w11.shape[0]), xs.dtype)
        hs = []
        for t in range(t_len):
            h = cell.step(layer, spec.activation, h, inputs[t]) + probe[t]
            hs.append(h)
        return jnp.stack(hs)

    inputs = xs
    for k in range(spec.num_layers):
        merged = run(params.layers[k], inputs, eps[k * d])
        if spec.bidirectional:  # the reverse net reads the sequence backwards; states in input time
            hr = run(params.reverse_layers[k], inputs[::-1], eps[k * d + 1][::-1])[::-1]
            merged = jnp.concatenate([merged, hr], -1) if spec.merge == "concat" else merged + hr
        inputs = merged
    z2s = inputs @ params.readout.w2 + params.readout.b2
    ys = activations.output(spec.output_activation, z2s)
    return jnp.sum(w * losses.divergence(spec.divergence, z2s, ys, problem.targets)) / batch


def _check_profile_against_autodiff(problem, rtol):
    spec = problem.spec
    t_len, batch = problem.xs.shape[:2]
    batch_like = data.Batch(problem.xs, problem.targets, None, None)
    profile = gradflow.gradient_flow(problem.params, spec, batch_like)
    assert list(profile) == list(spec.state_labels())
    eps = [jnp.zeros((t_len, batch, n1), problem.xs.dtype) for n1 in spec.state_sizes()]
    d = spec.num_directions
    # the Python-loop network jitted: one program, not one per operation of the loops
    probe_loss = jax.jit(lambda e, w: _probe_loss(problem, w, e))
    probe_grad = jax.jit(jax.grad(lambda e, w: _probe_loss(problem, w, e)))
    for direction, step in ((0, t_len - 1), (1, 0))[:d]:
        w = jnp.zeros((t_len, batch), problem.xs.dtype).at[step].set(1.0)
        # the probe network is the library's network: same DIV
        want_loss = bptt_loss(problem.params, spec, problem.xs, problem.targets, weights=w)
        chex.assert_trees_all_close(probe_loss(eps, w), want_loss, rtol=rtol)
        dh = probe_grad(eps, w)
        for j, label in enumerate(spec.state_labels()):
            if j % d != direction:
                continue
            norms = np.asarray(jnp.mean(jnp.linalg.norm(dh[j], axis=-1), axis=1))
            want = norms[::-1] if direction == 0 else norms  # by distance from the loss step
            scale = max(float(np.max(want)), 1e-30)
            np.testing.assert_allclose(profile[label], want, rtol=rtol, atol=rtol * scale, err_msg=label)


@pytest.mark.parametrize("float64", [False, True])
@settings(max_examples=4)  # each example differentiates Python-loop networks op by op (slow)
@given(problem=ref.problems(max_t=5, max_layers=2, lengths=False))
def test_profile_equals_autodiff_probe_norms(problem, float64):
    # Any stack (uni or bidirectional, any activation, divergence and merge): every line of the
    # picture is ||dDIV/dh(t)|| by jax.grad, with the loss on the last step (forward nets) or the
    # first (reverse nets), read by distance; float64 tight, float32 within 1e-4.
    assume(problem.xs.shape[0] >= 2)
    if float64:
        with jax.enable_x64(True):
            _check_profile_against_autodiff(ref.cast(problem, jnp.float64), 1e-9)
    else:
        _check_profile_against_autodiff(problem, 1e-4)


def test_one_step_sequences_are_refused_by_name():
    spec = RNNSpec(2, (3,), 1, output_activation="identity", divergence="squared_error")
    batch = data.adding_batch(np.random.default_rng(0), 1, 2)
    with pytest.raises(gradflow.GradflowError, match="needs T >= 2 steps, the batch has T = 1"):
        gradflow.gradient_flow(init_params(jax.random.key(0), spec), spec, batch)


def test_negative_stop_below_is_a_config_error():
    from bptt_jax.command.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.stop_below.*expected a value >= 0, got -1"):
        load_config(ROOT / "configs" / "adding_irnn_150.toml", ["train.stop_below=-1"])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gradflow_command_for_gated_cells(cell, tmp_path, capsys):
    """`bptt-jax gradflow` for the gated cells (no W11 spectral radius); the LSTM also draws
    ||dDIV/dc(t)||, which is aux.dc_norms read from the loss step (its oracle is in test_cells)."""
    config = ROOT / "configs" / "adding_tanh_150.toml"
    sets = [*TINY, f"model.cell={cell}", "model.bidirectional=true"]
    out = tmp_path / "gf"
    assert cli.main(["gradflow", str(config), *sum((["--set", s] for s in sets), []), "--out", str(out)]) == 0
    record = json.loads((out / "gradflow.json").read_text())
    labels = [line["label"] for line in record["lines"]]
    if cell == "gru":
        assert labels == ["layer 1 forward", "layer 1 reverse"]
    else:
        assert labels == ["layer 1 forward", "layer 1 forward c(t)", "layer 1 reverse", "layer 1 reverse c(t)"]
        assert [line["loss_step"] for line in record["lines"]] == ["last", "last", "first", "first"]
        cfg = load_config(config, sets)
        task, spec, optimizer = runner.build(cfg)
        params = runner.initial_state(cfg, spec, optimizer).params
        batch = task.train_batch(0)
        w = np.zeros((12, 4), np.float32)
        w[-1] = 1.0
        aux = bptt(params, spec, jnp.asarray(batch.xs), batch.targets, weights=w, diagnostics=True)[2]
        np.testing.assert_allclose(record["lines"][1]["norms"], np.asarray(aux.dc_norms)[::-1, 0], rtol=1e-6)
    assert "w11_spectral_radius" not in record and "spectral radius" not in capsys.readouterr().out
