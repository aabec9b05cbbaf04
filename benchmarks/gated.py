"""The gated cells' contenders for ``bptt_speed.py --cell gru|lstm`` (one layer + softmax readout).

Every contender computes forward + cross-entropy (summed over t, averaged over B) + the gradients of
all parameters, float32, from the same weights; their gradients are checked against the default
``bptt`` call's before timing. The JAX autodiff contenders write the cell step out themselves
(PyTorch's equations, gate orders r|z|n and i|f|g|o), so they share no code with the library.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax as bj
from bptt_jax.core import cells as bj_cells
from bptt_jax.layers.torch import from_torch_state_dict, to_torch_state_dict

FLAX_CELLS = {"gru": "GRUCell", "lstm": "OptimizedLSTMCell"}
TORCH_MODULES = {"elman": "RNN", "gru": "GRU", "lstm": "LSTM"}


def _ce(z2s, targets):
    logp = jax.nn.log_softmax(z2s, -1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)) / z2s.shape[1]


def _step(cell, p, a_t, s):
    """One step from the input side a_t = X(t) Wx + bx: (new state, h(t)); s is h (GRU) or (h, c)."""
    if cell == "gru":
        v = s @ p.wh + p.bh
        ar, az, an = jnp.split(a_t, 3, -1)
        vr, vz, vn = jnp.split(v, 3, -1)
        r, z = jax.nn.sigmoid(ar + vr), jax.nn.sigmoid(az + vz)
        n = jnp.tanh(an + r * vn)
        h = (1 - z) * n + z * s
        return h, h
    h, c = s
    i, f, g, o = jnp.split(a_t + h @ p.wh + p.bh, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def _zero_state(cell, b, n1, dtype):
    h = jnp.zeros((b, n1), dtype)
    return h if cell == "gru" else (h, h)


def plain_loss(cell):
    """What most users write: projection, recurrence, readout and loss all inside the scan body."""

    def loss(params, xs, targets):
        p, ro = params.layers[0], params.readout

        def body(carry, inp):
            s, total = carry
            x_t, d_t = inp
            s, h = _step(cell, p, x_t @ p.wx + p.bx, s)
            logp = jax.nn.log_softmax(h @ ro.w2 + ro.b2, -1)
            return (s, total - jnp.sum(jnp.take_along_axis(logp, d_t[:, None], -1))), None

        s0 = _zero_state(cell, xs.shape[1], p.wh.shape[0], xs.dtype)
        (_, total), _ = jax.lax.scan(body, (s0, jnp.zeros((), xs.dtype)), (xs, targets))
        return total / xs.shape[1]

    return loss


def hoisted_loss(cell, unroll):
    """The input projection before the scan, readout and loss after it: only the recurrence inside."""

    def loss(params, xs, targets):
        p, ro = params.layers[0], params.readout
        s0 = _zero_state(cell, xs.shape[1], p.wh.shape[0], xs.dtype)
        _, hs = jax.lax.scan(lambda s, a_t: _step(cell, p, a_t, s), s0, xs @ p.wx + p.bx, unroll=unroll)
        return _ce(hs @ ro.w2 + ro.b2, targets)

    return loss


def jax_contenders(cell, spec):
    c = {
        "bptt": lambda p, x, d: bj.bptt(p, spec, x, d),
        "bptt gates=store": lambda p, x, d: bj.bptt(p, spec, x, d, gates="store"),
        "bptt gates=recompute": lambda p, x, d: bj.bptt(p, spec, x, d, gates="recompute"),
        "grad(loss)": jax.value_and_grad(lambda p, x, d: bj.loss(p, spec, x, d)),
        "grad(plain scan)": jax.value_and_grad(plain_loss(cell)),
    }
    for u in (1, 4):
        c[f"grad(hoisted, unroll={u})"] = jax.value_and_grad(hoisted_loss(cell, u))
    return c


def _cols(w, k, n1):
    return w[..., k * n1 : (k + 1) * n1]


def flax_contender(cell, spec):
    """linen ``nn.RNN(nn.GRUCell | nn.OptimizedLSTMCell)`` + Dense, with our weights mapped exactly."""
    try:
        import flax.linen as nn
    except Exception:
        return None
    n1 = spec.hidden_sizes[0]
    cell_cls = getattr(nn, FLAX_CELLS[cell])

    class Model(nn.Module):
        @nn.compact
        def __call__(self, xs_bt):  # flax's RNN is batch-major
            return nn.Dense(spec.output_size)(nn.RNN(cell_cls(n1))(xs_bt))

    model = Model()

    def to_flax(params):
        p, ro = params.layers[0], params.readout
        if cell == "gru":  # r and z: one bias (ours are summed); n: b_in on the input side, b_hn inside r * (...)
            c = {
                "ir": {"kernel": _cols(p.wx, 0, n1), "bias": _cols(p.bx + p.bh, 0, n1)},
                "iz": {"kernel": _cols(p.wx, 1, n1), "bias": _cols(p.bx + p.bh, 1, n1)},
                "in": {"kernel": _cols(p.wx, 2, n1), "bias": _cols(p.bx, 2, n1)},
                "hr": {"kernel": _cols(p.wh, 0, n1)},
                "hz": {"kernel": _cols(p.wh, 1, n1)},
                "hn": {"kernel": _cols(p.wh, 2, n1), "bias": _cols(p.bh, 2, n1)},
            }
        else:  # the input Dense has no bias, the recurrent one holds the sum of ours
            c = {}
            for k, g in enumerate("ifgo"):
                c[f"i{g}"] = {"kernel": _cols(p.wx, k, n1)}
                c[f"h{g}"] = {"kernel": _cols(p.wh, k, n1), "bias": _cols(p.bx + p.bh, k, n1)}
        return {"params": {FLAX_CELLS[cell] + "_0": c, "Dense_0": {"kernel": ro.w2, "bias": ro.b2}}}

    def from_flax(g):
        c, dense = g["params"][FLAX_CELLS[cell] + "_0"], g["params"]["Dense_0"]
        if cell == "gru":
            wx = jnp.concatenate([c[k]["kernel"] for k in ("ir", "iz", "in")], -1)
            wh = jnp.concatenate([c[k]["kernel"] for k in ("hr", "hz", "hn")], -1)
            bx = jnp.concatenate([c[k]["bias"] for k in ("ir", "iz", "in")], -1)
            bh = jnp.concatenate([c[k]["bias"] for k in ("ir", "iz", "hn")], -1)  # d/db_hr = d/db_ir, ...
        else:
            wx = jnp.concatenate([c[f"i{k}"]["kernel"] for k in "ifgo"], -1)
            wh = jnp.concatenate([c[f"h{k}"]["kernel"] for k in "ifgo"], -1)
            bx = bh = jnp.concatenate([c[f"h{k}"]["bias"] for k in "ifgo"], -1)
        layer = bj_cells.get(cell).Params(wx, wh, bx, bh)
        return bj.RNNParams((layer,), (), bj.ReadoutParams(dense["kernel"], dense["bias"]))

    def loss(fp, xs, targets):
        z2 = model.apply(fp, jnp.swapaxes(xs, 0, 1))
        return _ce(jnp.swapaxes(z2, 0, 1), targets)

    return jax.value_and_grad(loss), to_flax, from_flax, f"flax RNN({FLAX_CELLS[cell]})"


def torch_compile(fn, allow_rnn=True):
    """``torch.compile(fn)`` with ``torch._dynamo.config.allow_rnn`` set (off, dynamo runs
    nn.RNN/GRU/LSTM eagerly). Returns (compiled fn, a function giving the number of graphs compiled)."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.config.allow_rnn = allow_rnn
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    return torch.compile(fn), lambda: counters["stats"]["unique_graphs"] - before


def torch_contender(cell, spec, params, xs, targets, threads, compiled=False):
    """nn.RNN / nn.GRU / nn.LSTM + Linear, eager or compiled; None when torch or its compiler is
    unavailable. Returns (run, grads, note) where note says how many graphs torch.compile produced."""
    try:
        import torch
    except Exception:
        return None
    torch.set_num_threads(threads)
    n1 = spec.hidden_sizes[0]
    if cell == "elman":
        rnn = torch.nn.RNN(spec.input_size, n1, nonlinearity=spec.activation)
    else:
        rnn = getattr(torch.nn, TORCH_MODULES[cell])(spec.input_size, n1)
    model = torch.nn.ModuleDict({"rnn": rnn, "readout": torch.nn.Linear(n1, spec.output_size)})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch_state_dict(params, spec).items()})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    x = torch.from_numpy(np.array(xs)).to(dev)
    d = torch.from_numpy(np.array(targets)).long().to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t, b = d.shape

    def loss_fn(x, d):
        out, _ = model["rnn"](x)
        z2 = model["readout"](out)
        return torch.nn.functional.cross_entropy(z2.reshape(t * b, -1), d.reshape(-1), reduction="sum") / b

    note = "eager"
    if compiled:
        eager_fn, note = loss_fn, ""
        for allow_rnn in (True, False):  # with the recurrent layer in the graph, else around it
            try:
                loss_fn, graphs = torch_compile(eager_fn, allow_rnn)
                loss_fn(x, d).backward()  # compile now, outside the timed rounds
                break
            except Exception as e:  # no compiler toolchain, unsupported op, ...
                print(f"torch.compile (allow_rnn={allow_rnn}) failed: {type(e).__name__}: {e}", file=sys.stderr)
                note = f"allow_rnn failed ({type(e).__name__}); "
        else:
            return None
        if not allow_rnn:
            note += f"nn.{TORCH_MODULES[cell]} runs eagerly ({graphs()} graph(s) compiled around it)"
        else:
            note += f"{graphs()} graph(s) compiled" if graphs() else "eager (no graph compiled)"

    def run():
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(x, d)
        loss.backward()
        sync()
        return loss

    def grads():
        run()
        g = {k: p.grad.cpu().numpy() for k, p in model.named_parameters()}
        if cell == "elman":  # b1 = bias_ih + bias_hh; its gradient is either one's, not their sum
            g = {k: np.zeros_like(v) if "bias_hh" in k else v for k, v in g.items()}
        return from_torch_state_dict(g, spec)

    return run, grads, note


def bench_shape(cell, shape, rounds, threads, flops_per_s, tools, torch_compiled=True):
    """Medians, per-contender info and the roofline for one cell at one shape. ``tools`` holds the
    measuring helpers of bptt_speed (compile_jax, max_rel_err, round_robin, block)."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    if cell == "gru":  # a non-zero b_hn, so a mapping that drops it shows in the error column
        layer = params.layers[0]
        bh = layer.bh.at[2 * n1 :].set(0.1 * jax.random.normal(jax.random.key(3), (n1,)))
        params = params._replace(layers=(layer._replace(bh=bh),))
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    runners, info = {}, {}
    ref = None
    for name, fn in jax_contenders(cell, spec).items():
        compiled, secs, temp, arg = tools.compile_jax(fn, params, xs, targets)
        out = compiled(params, xs, targets)[:2]
        ref = out if ref is None else ref
        info[name] = {"compile_s": secs, "temp": temp, "arg": arg, "err": tools.max_rel_err(out, ref), "note": ""}
        runners[name] = lambda c=compiled: tools.block(c(params, xs, targets))
    direct = lambda: bj.bptt(params, spec, xs, targets)  # the call a user makes, no outer jit
    t0 = time.perf_counter()
    value, grads, _ = direct()
    tools.block(grads)
    info["bptt (direct call)"] = dict(info["bptt"], compile_s=time.perf_counter() - t0)
    info["bptt (direct call)"]["err"] = tools.max_rel_err((value, grads), ref)
    runners["bptt (direct call)"] = lambda: tools.block(direct())
    fl = flax_contender(cell, spec)
    if fl is not None:
        vg, to_flax, from_flax, name = fl
        fp = to_flax(params)
        compiled, secs, temp, arg = tools.compile_jax(vg, fp, xs, targets)
        value, g = compiled(fp, xs, targets)
        err = tools.max_rel_err((value, from_flax(g)), ref)
        info[name] = {"compile_s": secs, "temp": temp, "arg": arg, "err": err, "note": ""}
        runners[name] = lambda c=compiled: tools.block(c(fp, xs, targets))
    label = TORCH_MODULES[cell]
    modes = ((False, f"torch nn.{label}"), (True, f"torch.compile nn.{label}"))
    for compiled, name in modes if torch_compiled else modes[:1]:
        t0 = time.perf_counter()
        tc = torch_contender(cell, spec, params, xs, targets, threads, compiled=compiled)
        if tc is None:
            continue
        run, grads_fn, note = tc
        info[name] = {
            "compile_s": time.perf_counter() - t0 if compiled else float("nan"),
            "temp": float("nan"),
            "arg": float("nan"),
            "err": tools.max_rel_err(grads_fn(), ref[1]),
            "note": note,
        }
        runners[name] = run
    med = tools.round_robin(runners, rounds)
    g = 3 if cell == "gru" else 4
    fwd = 2 * t * b * g * (n * n1 + n1 * n1) + 2 * t * b * n1 * m
    roofline = (3 * fwd - 2 * t * b * g * n * n1) / flops_per_s  # as bptt_speed.pass_flops, G gates wide
    return med, info, roofline
