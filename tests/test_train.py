import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax.command import data
from bptt_jax.command.config import OptimConfig
from bptt_jax.training import train
from tests import reference as ref


def _batch(p, reset=True):
    t, b = p.xs.shape[:2]
    return data.Batch(np.asarray(p.xs), np.asarray(p.targets), np.ones((t, b), np.float32), np.full((b,), reset))


def test_train_step_does_not_retrace():
    spec = bj.RNNSpec(3, (4,), 5)
    opt = train.make_optimizer(OptimConfig(), 10)
    state = train.init_state(jax.random.key(0), spec, opt, 2)
    step = jax.jit(chex.assert_max_traces(train.make_train_step(spec, opt, stateful=True, jit=False), n=1))
    for seed in range(5):
        state, m = step(state, _batch(ref.make_problem(spec, 6, 2, seed=seed), reset=seed == 0))
    assert int(state.step) == 5 and np.isfinite(float(m.loss))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_bptt_and_autodiff_steps_agree(bidirectional):
    spec = bj.RNNSpec(3, (4, 3), 5, bidirectional=bidirectional)
    opt = train.make_optimizer(OptimConfig(name="adam", learning_rate=0.01), 10)
    s1 = s2 = train.init_state(jax.random.key(0), spec, opt, 2)
    f1 = train.make_train_step(spec, opt, "bptt")
    f2 = train.make_train_step(spec, opt, "autodiff")
    for seed in range(3):
        b = _batch(ref.make_problem(spec, 5, 2, seed=seed))
        s1, m1 = f1(s1, b)
        s2, m2 = f2(s2, b)
        np.testing.assert_allclose(m1.loss, m2.loss, rtol=1e-5)
    assert ref.max_rel_err(s1.params, s2.params) < 1e-4


def test_truncated_bptt_carry_equals_one_run_over_both_chunks():
    spec = bj.RNNSpec(3, (4, 2), 5)
    opt = train.make_optimizer(OptimConfig(name="sgd", learning_rate=1e-30, clip="none"), 10)
    state = train.init_state(jax.random.key(0), spec, opt, 2)
    step = train.make_train_step(spec, opt, stateful=True)
    p = ref.make_problem(spec, 8, 2, seed=3)
    chunk1 = data.Batch(
        np.asarray(p.xs[:4]), np.asarray(p.targets[:4]), np.ones((4, 2), np.float32), np.array([True, True])
    )
    chunk2 = data.Batch(
        np.asarray(p.xs[4:]), np.asarray(p.targets[4:]), np.ones((4, 2), np.float32), np.array([False, False])
    )
    state, _ = step(state, chunk1)
    state, _ = step(state, chunk2)
    whole = bj.forward(state.params, spec, p.xs).h_last
    for a, b in zip(state.carry, whole):  # float32: the training step may run the compiled kernel,
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # forward its scans (rounding apart)
    # A reset (the stream wrapped) starts from zeros again.
    state2, _ = step(state, chunk1)
    first = bj.forward(state.params, spec, p.xs[:4]).h_last
    for a, b in zip(state2.carry, first):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nonfinite_update_is_skipped_and_counted():
    spec = bj.RNNSpec(3, (4,), 5)
    opt = train.make_optimizer(OptimConfig(), 10)
    state = train.init_state(jax.random.key(0), spec, opt, 2)
    step = train.make_train_step(spec, opt)
    p = ref.make_problem(spec, 4, 2, seed=0)
    bad = _batch(p)._replace(xs=np.where(np.arange(4)[:, None, None] == 2, np.nan, np.asarray(p.xs)).astype(np.float32))
    new, m = step(state, bad)
    assert not bool(m.finite) and int(new.nonfinite_in_row) == 1 and int(new.nonfinite_total) == 1
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    new, m = step(new, bad)
    assert int(new.nonfinite_in_row) == 2
    new, m = step(new, _batch(p))
    assert bool(m.finite) and int(new.nonfinite_in_row) == 0 and int(new.nonfinite_total) == 2


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adagrad", "rmsprop"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine", "warmup_constant"])
def test_every_optimizer_and_schedule_lowers_the_loss(name, schedule):
    spec = bj.RNNSpec(3, (8,), 4)
    lr = {"sgd": 0.5, "momentum": 0.2}.get(name, 0.03)
    opt = train.make_optimizer(OptimConfig(name=name, learning_rate=lr, schedule=schedule, warmup_steps=3), 40)
    state = train.init_state(jax.random.key(0), spec, opt, 4)
    step = train.make_train_step(spec, opt)
    b = _batch(ref.make_problem(spec, 5, 4, seed=1))
    first = None
    for _ in range(40):
        state, m = step(state, b)
        first = float(m.loss) if first is None else first
    assert float(m.loss) < 0.9 * first


def test_elementwise_clip_matches_min_char_rnn():
    """clip = "value" clips each gradient entry to [-c, c] before Adagrad, as min-char-rnn."""
    spec = bj.RNNSpec(3, (4,), 5)
    cfg = OptimConfig(
        name="adagrad", learning_rate=0.1, clip="value", clip_value=0.01, initial_accumulator=0.0, eps=1e-8
    )
    opt = train.make_optimizer(cfg, 10)
    state = train.init_state(jax.random.key(0), spec, opt, 2)
    p = ref.make_problem(spec, 4, 2, seed=0)
    _, grads, _ = bj.bptt(state.params, spec, p.xs, p.targets)
    new, _ = train.make_train_step(spec, opt)(state, _batch(p))
    g = jax.tree_util.tree_map(lambda x: jnp.clip(x, -0.01, 0.01), grads)
    want = jax.tree_util.tree_map(lambda w, gi: w - 0.1 * gi / jnp.sqrt(gi * gi + 1e-8), state.params, g)
    assert ref.max_rel_err(new.params, want) < 1e-5
