"""``bptt_jax.tune`` and the plan cache (``bptt_jax.core.plancache``).

A tuned plan changes how the gradient is computed, never its value: the plans ``bptt`` resolves to
from the cache give jax.grad's gradients (float64, 1e-10). The cache: what tune records is what a
later call traces; a corrupt file, an entry that does not parse, another jax version's key, a
directory that cannot be written, concurrent writers, the switch that turns it off. Every test
here points BPTT_JAX_CACHE_DIR at its own tmp_path (conftest already keeps the suite away from the
user's cache).
"""

from __future__ import annotations

import json
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax.core import budget, checks, gradient, plan, plancache, vjp
from tests import reference as ref

T, B = 12, 3


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BPTT_JAX_PLAN_CACHE", raising=False)
    gradient._compiled.cache_clear()  # calls traced before (another cache) must trace again
    yield tmp_path
    gradient._compiled.cache_clear()


@pytest.fixture
def traced(monkeypatch):
    """The plans ``bptt`` resolved to while tracing, in order."""
    seen = []
    resolve = plan.resolve

    def spy(*args, **kwargs):
        p = resolve(*args, **kwargs)
        seen.append(p)
        return p

    monkeypatch.setattr(plan, "resolve", spy)
    return seen


def _problem(cell="gru", dtype=jnp.float64, bidirectional=False, t_len=T):
    spec = bj.RNNSpec(3, (5,), 4, cell=cell, bidirectional=bidirectional)
    return ref.make_problem(spec, t_len, B, seed=3, use_lengths=True, dtype=dtype), spec


def _key(spec, p, **options):
    return plan.cache_key(plan.Options(**options), spec, T, B, p.xs.dtype)


def _check_against_autodiff(p, spec, **kw):
    div, grads, _ = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, **kw)
    loss = lambda params: bj.loss(params, spec, p.xs, p.targets, lengths=p.lengths)  # noqa: E731
    want = jax.grad(loss)(p.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), grads, want)
    np.testing.assert_allclose(div, loss(p.params), rtol=1e-12)


def test_tune_records_a_plan_that_later_calls_trace(cache, traced):
    with jax.enable_x64(True):
        p, spec = _problem()
        structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (p.xs, p.targets, p.lengths))
        chosen = bj.tune(p.params, spec, structs[0], structs[1], lengths=structs[2], time_budget=20, progress=False)
        entries = json.loads((cache / plancache.FILE).read_text())["entries"]
        entry = entries[_key(spec, p)]
        assert (entry["block_size"], entry["gates"], entry["unroll"]) == (
            chosen.block,
            "store" if chosen.store else "recompute",
            chosen.unroll,
        )
        assert entry["plans_measured"] >= 2 and entry["seconds"] > 0 and entry["temp_bytes"] > 0
        traced.clear()
        _check_against_autodiff(p, spec)
        assert traced[0] == chosen


@pytest.mark.parametrize("cell", ["elman", "lstm"])
def test_a_cached_plan_is_used_for_what_the_caller_left_open(cache, traced, cell):
    with jax.enable_x64(True):
        p, spec = _problem(cell, bidirectional=cell == "lstm")
        gates = "store" if cell == "lstm" else "recompute"
        entry = {"block_size": 5, "gates": gates, "unroll": 2, "recurrence": "scan"}
        assert plancache.record(_key(spec, p), entry)
        _check_against_autodiff(p, spec)  # T = 12 padded to 15: the padded steps hold the state
        assert (traced[-1].block, traced[-1].store, traced[-1].unroll) == (5, cell == "lstm", 2)
        # a caller's own choice is kept; its key (the fixed choice is part of it) has no entry: the rules
        _check_against_autodiff(p, spec, block_size=4)
        rules = plan.resolve(plan.Options(block_size=4), spec, T, B, p.xs.dtype, use_cache=False)
        assert traced[-1] == rules


def test_corrupt_file_and_bad_entries_warn_and_are_ignored(cache, traced):
    with jax.enable_x64(True):
        p, spec = _problem("elman")
        rules = plan.resolve(plan.Options(), spec, T, B, p.xs.dtype, use_cache=False)
        (cache / plancache.FILE).write_text("{not json")
        with pytest.warns(plancache.PlanCacheWarning, match="corrupt"):
            _check_against_autodiff(p, spec)
        assert traced[-1] == rules
        for bad in (
            {"block_size": 0, "gates": "recompute", "unroll": 1, "recurrence": "scan"},
            {"block_size": 4, "gates": "store", "unroll": 1, "recurrence": "scan"},  # the Elman cell has no gates
            {"block_size": 4, "gates": "recompute", "unroll": -1, "recurrence": "scan"},
            {"block_size": 4},
        ):
            (cache / plancache.FILE).unlink()
            assert plancache.record(_key(spec, p), bad)
            gradient._compiled.cache_clear()
            with pytest.warns(plancache.PlanCacheWarning, match="does not parse"):
                _check_against_autodiff(p, spec)
            assert traced[-1] == rules


def test_another_versions_key_does_not_match(cache, traced):
    with jax.enable_x64(True):
        p, spec = _problem("elman")
        stale = json.loads(_key(spec, p))
        stale["jax"] = "0.0.1"
        entry = {"block_size": 3, "gates": "recompute", "unroll": 1, "recurrence": "scan"}
        assert plancache.record(json.dumps(stale, sort_keys=True, separators=(",", ":")), entry)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check_against_autodiff(p, spec)
        assert traced[-1] == plan.resolve(plan.Options(), spec, T, B, p.xs.dtype, use_cache=False)


def test_another_processors_key_does_not_match(cache, traced, monkeypatch):
    """JAX calls every CPU "cpu": a cache shared by machines with other processors (a home
    directory on a cluster) must not hand one machine's plan to another. The key holds the host."""
    here = plancache.host()
    assert here["cores"] >= 1 and here["cpu"]
    with jax.enable_x64(True):
        p, spec = _problem("elman")
        other = {**here, "isa": [*here["isa"], "an-extension-this-machine-lacks"]}
        monkeypatch.setattr(plancache, "host", lambda: other)
        entry = {"block_size": 3, "gates": "recompute", "unroll": 1, "recurrence": "scan"}
        assert plancache.record(_key(spec, p), entry)  # tuned "there"
        assert json.loads(_key(spec, p))["host"] == other
        monkeypatch.setattr(plancache, "host", lambda: here)  # read "here"
        assert _key(spec, p) not in json.loads((cache / plancache.FILE).read_text())["entries"]
        _check_against_autodiff(p, spec)
        assert traced[-1] == plan.resolve(plan.Options(), spec, T, B, p.xs.dtype, use_cache=False)
        assert traced[-1].block != 3  # the rules' block: the other machine's entry was not read


def test_a_candidate_must_win_the_head_to_head_round_by_round():
    from bptt_jax.core import tune

    rules = [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert tune.wins_head_to_head([9.0] * 6, rules)  # 10% faster in every round
    assert not tune.wins_head_to_head([9.7] * 6, rules)  # 3%: inside the margin
    # one slow round (the machine's load) in both: the paired ratios still say 10% faster
    assert tune.wins_head_to_head([9.0, 9.0, 18.0, 9.0, 9.0, 9.0], [10.0, 10.0, 20.0, 10.0, 10.0, 10.0])
    # the medians of the two lists alone would say 10% faster; round by round it lost two of six
    assert not tune.wins_head_to_head([9.0, 9.0, 9.0, 9.0, 11.0, 11.0], [10.0, 10.0, 10.0, 10.0, 8.0, 8.0])
    assert not tune.wins_head_to_head([], [])


@pytest.mark.parametrize("verdicts", [(False, True), (False, False, True)])
def test_where_the_fastest_ties_the_next_fastest_gets_a_head_to_head(monkeypatch, verdicts):
    """The search's fastest plan that loses (ties) its head-to-head with the rules' plan is not the
    end: the next fastest gets one, up to tune.CHALLENGERS plans, each against the rules' plan; the
    first that wins is chosen, none winning keeps the rules' plan. Here the rules' plan does 16
    times the work of two others, and the head-to-heads' verdicts are given in order."""
    from bptt_jax.core import tune

    default, fast_a, fast_b = (plan.Options(unroll=1, block_size=c) for c in (1, 2, 3))
    a = jnp.asarray(np.random.RandomState(0).randn(96, 96), jnp.float32)

    def build(o):
        def f(x):
            for _ in range(16 if o == default else 1):
                x = jnp.tanh(x @ x)
            return x

        return f

    given, asked = list(verdicts), []

    def verdict(candidate_times, rules_times):
        assert len(candidate_times) == len(rules_times) > 0  # the rounds pair up
        asked.append(len(asked))
        return given.pop(0)

    monkeypatch.setattr(tune, "wins_head_to_head", verdict)
    start = tune.time.perf_counter()
    best, measured = tune._search(
        default, [default, fast_a, fast_b], build, (a,), plan.Options(unroll=1), None, 5.0, 3, False, start
    )
    assert tune.CHALLENGERS == 2 and len(asked) == 2  # two head-to-heads, whatever the verdicts after
    # the times left are those of the last head-to-head: the rules' plan and the second challenger
    last = [o for o in (fast_a, fast_b) if measured[o]["times"]]
    assert len(last) == 1 and measured[default]["times"]
    assert best == (last[0] if verdicts[1] else default)


def test_a_fast_plans_sample_is_the_mean_of_several_calls(cache, monkeypatch):
    """Each timing sample of a plan whose call is shorter than tune.SAMPLE_S is the mean of several
    calls (as many as its second call says would last about SAMPLE_S, at most MAX_REPS): at this
    tiny problem the plans take several calls per sample, and their samples are per-call times
    (a sample's sum of calls would be reps times as long)."""
    from bptt_jax.core import tune

    seen = {}
    search = tune._search

    def spy(*args, **kwargs):
        best, measured = search(*args, **kwargs)
        seen.update(measured)
        return best, measured

    monkeypatch.setattr(tune, "_search", spy)
    # A sample of 20 ms instead of tune's 4: a call of this tiny problem takes well under a
    # millisecond alone, but a few on a machine busy with the other test worker's compiles (one CI
    # run saw no plan with 3 calls per 4 ms sample); at 20 ms, three calls need only under 6.7 ms each
    monkeypatch.setattr(tune, "SAMPLE_S", 0.02)
    p, spec = _problem(dtype=jnp.float32)
    bj.tune(p.params, spec, p.xs, p.targets, lengths=p.lengths, time_budget=10, progress=False, record=False)
    timed = [m for m in seen.values() if m["times"]]
    for m in timed:
        assert m["reps"] == min(tune.MAX_REPS, max(1, int(tune.SAMPLE_S // m["call_s"])))
    several = [m for m in timed if m["reps"] >= 3]
    assert several  # calls of well under 6.7 ms
    for m in several:  # per call, about the second call's time or less; not reps (>= 3 here) times it
        assert all(t > 0 for t in m["times"]) and np.median(m["times"]) < 3 * m["call_s"]


def test_concurrent_writers_lose_nothing(cache):
    def write(i):
        for j in range(5):
            assert plancache.record(f"key-{i}-{j}", {"n": i * 5 + j})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = json.loads((cache / plancache.FILE).read_text())["entries"]
    assert entries == {f"key-{i}-{j}": {"n": i * 5 + j} for i in range(8) for j in range(5)}
    assert [f.name for f in cache.iterdir() if f.name.startswith(".plans-")] == []  # no temporary left


def test_a_cache_that_cannot_be_written_warns_and_tuning_still_works(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(blocker / "plans"))  # below a file: cannot be created
    p, spec = _problem("elman", dtype=jnp.float32)
    with pytest.warns(plancache.PlanCacheWarning, match="cannot be written"):
        chosen = bj.tune(p.params, spec, p.xs, p.targets, time_budget=0, rounds=1, progress=False)
    assert chosen == plan.resolve(plan.Options(), spec, T, B, jnp.float32, use_cache=False)  # only the rules' plan
    assert not (blocker / "plans").exists()


def test_the_cache_can_be_turned_off_and_is_never_the_users(cache, monkeypatch):
    p, spec = _problem("elman", dtype=jnp.float32)
    key = _key(spec, p)
    assert plancache.record(key, {"block_size": 3, "gates": "recompute", "unroll": 1, "recurrence": "scan"})
    assert plancache.lookup(key, spec, T)["block_size"] == 3
    monkeypatch.setenv("BPTT_JAX_PLAN_CACHE", "off")
    assert plancache.lookup(key, spec, T) is None
    assert not plancache.record(key, {})
    monkeypatch.delenv("BPTT_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "xdg"))
    assert plancache.cache_dir() == cache / "xdg" / "bptt_jax"


@pytest.fixture
def states_plans(monkeypatch):
    """The (unroll, recurrence, layout) ``rnn_states`` ran its custom VJP with, in order."""
    seen = []
    states = vjp._states

    def spy(spec, unroll, rec, layout, *args):
        seen.append((unroll, rec, layout))
        return states(spec, unroll, rec, layout, *args)

    monkeypatch.setattr(vjp, "_states", spy)
    return seen


def _states_grads(p, spec, **kw):
    """d(sum(states * probe) + sum(sin(final states)))/d(params, xs) of ``rnn_states`` (float64)."""
    t_len = p.xs.shape[0]
    probe = jnp.cos(jnp.arange(t_len * B * 5, dtype=p.xs.dtype)).reshape(t_len, B, 5)

    def f(params, xs):
        states, last = vjp.rnn_states(params, spec, xs, lengths=p.lengths, return_last=True, **kw)
        return jnp.sum(states * probe) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(last))

    return jax.grad(f, argnums=(0, 1))(p.params, p.xs)


def test_tune_states_records_a_plan_that_rnn_states_runs(cache, states_plans):
    """tune_states' entry is keyed apart from bptt's and read by rnn_states when traced: a plan put
    in its place (block 4, unroll 2, gates recomputed) is what the custom VJP then runs, with
    grad="autodiff"'s gradients (float64, 1e-10); with a budget the entry's segments are run."""
    with jax.enable_x64(True):
        p, spec = _problem("gru")
        structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (p.xs, p.lengths))
        chosen = bj.tune_states(p.params, spec, structs[0], lengths=structs[1], time_budget=4, progress=False)
        key = plan.cache_key(plan.Options(), spec, T, B, p.xs.dtype, entry="rnn_states")
        assert key != _key(spec, p)
        entry = json.loads((cache / plancache.FILE).read_text())["entries"][key]
        assert (entry["block_size"], entry["gates"], entry["unroll"]) == (
            chosen.block,
            "store" if chosen.store else "recompute",
            chosen.unroll,
        )
        assert entry["plans_measured"] >= 2 and entry["seconds"] > 0
        want = _states_grads(p, spec, grad="autodiff")
        assert plancache.record(key, {"block_size": 4, "gates": "recompute", "unroll": 2, "recurrence": "scan"})
        got = _states_grads(p, spec)
        assert states_plans[-1] == (2, "scan", ("recompute", 4, None))
        assert ref.max_rel_err(got, want) < 1e-10
        limit = 10**9
        budget_key = plan.cache_key(plan.Options(), spec, T, B, p.xs.dtype, limit, entry="rnn_states")
        segments = {
            "block_size": 2,
            "gates": "recompute",
            "unroll": 1,
            "recurrence": "scan",
            "checkpoint_every": [6, 2],
        }
        assert plancache.record(budget_key, segments)
        got = _states_grads(p, spec, max_memory=limit)
        assert states_plans[-1] == (1, "scan", ("recompute", 2, (6, 2)))
        assert ref.max_rel_err(got, want) < 1e-10
        # an entry whose segments do not divide T runs them padded (T = 12 to 15), with the same gradients
        assert plancache.record(budget_key, dict(segments, checkpoint_every=5))
        got = _states_grads(p, spec, max_memory=limit)
        assert states_plans[-1] == (1, "scan", ("recompute", 2, 5))
        assert ref.max_rel_err(got, want) < 1e-10


def test_tune_states_under_a_budget_records_a_plan_that_fits(cache):
    """At 8T steps (at T the segments' fixed costs are about what they save), a budget below every
    unsegmented plan: tune_states records segments that fit, with autodiff's gradients."""
    t_len = 8 * T
    with jax.enable_x64(True):
        p, spec = _problem("lstm", t_len=t_len)
        probe = jnp.zeros((t_len, B, 5))
        _, h0, _ = checks.check_inputs(p.params, spec, p.xs, None, p.lengths)  # zeros, the internal layout
        args = (p.params, p.xs, h0, p.lengths, probe)
        temp = lambda lay: budget.temp_bytes(jax.jit(vjp.states_fwd_bwd(spec, 1, "scan", lay)).lower(*args).compile())  # noqa: E731
        limit = int(
            0.85 * min(temp(("recompute", c, None)) for c in range(1, t_len + 1) if t_len % c == 0)
        )  # below every unsegmented plan
        chosen = bj.tune_states(
            p.params, spec, p.xs, lengths=p.lengths, max_memory=limit, time_budget=4, progress=False
        )
        key = plan.cache_key(plan.Options(), spec, t_len, B, p.xs.dtype, limit, entry="rnn_states")
        entry = json.loads((cache / plancache.FILE).read_text())["entries"][key]
        assert entry["temp_bytes"] <= limit and entry["checkpoint_every"] is not None
        assert chosen.segment is not None
        assert (
            ref.max_rel_err(_states_grads(p, spec, max_memory=limit), _states_grads(p, spec, grad="autodiff")) < 1e-10
        )


def test_the_layers_tune_their_call(cache, states_plans):
    """NNX RNN / StackedRNN and the Equinox RNN: ``tune`` records the entry their next call reads
    (the plan it returned is the one run); a layer with grad="autodiff" has none to tune."""
    import equinox as eqx  # noqa: F401  (the Equinox layer needs it)
    from flax import nnx

    from bptt_jax.layers import equinox as beqx
    from bptt_jax.layers import nnx as bnnx

    x = jnp.asarray(np.random.RandomState(0).randn(B, T, 3), jnp.float32)
    layers = [
        bnnx.RNN(3, 5, cell="gru", rngs=nnx.Rngs(0)),
        bnnx.StackedRNN(3, (5, 4), cell="lstm", rngs=nnx.Rngs(0)),
        beqx.RNN(3, 5, cell="lstm", key=jax.random.key(0)),
    ]
    for layer in layers:
        chosen = layer.tune(x, time_budget=2, rounds=3, progress=False)
        layer(x)
        unroll, _, (gates, block, k) = states_plans[-1]
        assert (block, gates == "store", unroll, k) == (chosen.block, chosen.store, chosen.unroll, None)
    with pytest.raises(ValueError, match="grad is 'autodiff'"):
        bnnx.RNN(3, 5, grad="autodiff", rngs=nnx.Rngs(0)).tune(x)
    with pytest.raises(ValueError, match="grad is 'autodiff'"):
        beqx.RNN(3, 5, grad="autodiff", key=jax.random.key(0)).tune(x)
