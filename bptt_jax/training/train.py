"""Training with optax: the optimizer from a config, a jitted train step, truncated BPTT, evaluation.

    optimizer = make_optimizer(cfg.optim, total_steps)
    state = init_state(key, spec, optimizer, batch_size)
    step = make_train_step(spec, optimizer)            # jitted once: (state, batch) -> (state, metrics)
    state, metrics = step(state, batch)

Truncated BPTT for long streams: ``TrainState.carry`` holds the final states of the previous chunk;
the next chunk starts from them (gradients stop at the boundary, since h0 is an input of the BPTT,
not a function of the parameters) unless ``batch.reset`` says the stream wrapped.

A step whose loss or gradient is not finite changes nothing but the counters: parameters,
optimizer state and the carried state stay as they were (the carry is reset to zeros).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bptt_jax.core import forward, losses, vjp
from bptt_jax.core.gradient import bptt, loss_and_state
from bptt_jax.core.params import RNNParams, RNNSpec, init_params

Array = jax.Array


class Batch(NamedTuple):
    """One training or evaluation batch (NumPy arrays; the train step moves them to the device)."""

    xs: np.ndarray  # [T, B, N] float32 inputs
    targets: np.ndarray  # [T, B] int32 classes or [T, B, M] float32
    weights: np.ndarray  # [T, B] float32 w(t)
    reset: np.ndarray  # [B] bool: start from zero state (stream wrapped), for stateful tasks
    lengths: np.ndarray | None = None  # [B] int32 valid steps per sequence; None: all T (built-in tasks)


class TrainState(NamedTuple):
    step: Array  # [] int32 steps taken (including skipped ones)
    params: RNNParams
    opt_state: optax.OptState
    carry: tuple[Array, ...]  # L*D entries [B, W]: state carried to the next chunk (LSTM: [h | c], W = 2 N1)
    nonfinite_in_row: Array  # [] int32 consecutive skipped (non-finite) updates
    nonfinite_total: Array  # [] int32 skipped updates in all


class StepMetrics(NamedTuple):
    loss: Array  # [] DIV of the batch (mean over the batch of the sum over t)
    grad_norm: Array  # [] global norm of the gradient before clipping
    dh_norms: Array  # [T, L*D] ||dDIV/dh(t)|| (NaN with grad="autodiff", which does not expose it)
    finite: Array  # [] bool: the update was applied


def make_schedule(optim_cfg, total_steps: int):
    lr, warm = optim_cfg.learning_rate, optim_cfg.warmup_steps
    total = max(total_steps, warm + 1)
    if optim_cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if optim_cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total)
    if optim_cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), total)
    if optim_cfg.schedule == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [max(warm, 1)]
        )
    raise ValueError(f"optim.schedule: unknown value {optim_cfg.schedule!r}")


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """Clipping, then weight decay, then the optimizer, as one optax chain (see config.OptimConfig)."""
    o = optim_cfg
    lr = make_schedule(o, total_steps)
    parts = []
    if o.clip == "global_norm":
        parts.append(optax.clip_by_global_norm(o.clip_value))
    elif o.clip == "value":
        parts.append(optax.clip(o.clip_value))  # element-wise, min-char-rnn's np.clip(g, -5, 5)
    if o.name == "adam":
        parts.append(
            optax.adamw(lr, eps=o.eps, weight_decay=o.weight_decay) if o.weight_decay else optax.adam(lr, eps=o.eps)
        )
        return optax.chain(*parts)
    if o.weight_decay:
        parts.append(optax.add_decayed_weights(o.weight_decay))
    if o.name == "sgd":
        parts.append(optax.sgd(lr))
    elif o.name == "momentum":
        parts.append(optax.sgd(lr, momentum=o.momentum))
    elif o.name == "adagrad":
        parts.append(optax.adagrad(lr, initial_accumulator_value=o.initial_accumulator, eps=o.eps))
    elif o.name == "rmsprop":
        parts.append(optax.rmsprop(lr, eps=o.eps))
    else:
        raise ValueError(f"optim.name: unknown value {o.name!r}")
    return optax.chain(*parts)


def init_state(
    key: Array,
    spec: RNNSpec,
    optimizer,
    batch_size: int,
    *,
    scheme="uniform",
    scale=1.0,
    dtype=jnp.float32,
    forget_bias: float = 0.0,
) -> TrainState:
    params = init_params(key, spec, scheme=scheme, scale=scale, dtype=dtype, forget_bias=forget_bias)
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        optimizer.init(params),
        forward.default_h0(spec, batch_size, dtype),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def dropout_keep(key: Array, index: Array, T: int, width: int, p_keep: float) -> Array:
    """[T, B, width] bool keep-mask of dropout for the sequences at places ``index`` [B] of the
    global batch: sequence b's mask is drawn from ``fold_in(key, index[b])`` alone, so it does not
    depend on how the batch is split over devices or processes."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, p_keep, (T, width)))(keys)  # [B, T, width]
    return jnp.swapaxes(keep, 0, 1)


def _tree_where(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(
    spec: RNNSpec,
    optimizer: optax.GradientTransformation,
    grad: str = "bptt",
    *,
    stateful: bool = False,
    input_dropout: float = 0.0,
    output_dropout: float = 0.0,
    seed: int = 0,
    unroll: int | None = None,
    recurrence: str = "auto",
    max_memory: int | str | None = None,
    axis_name=None,
    jit: bool = True,
):
    """The pure train step ``(state, batch) -> (state, metrics)``, jitted once.

    Args:
      spec: the network.
      optimizer: an optax transformation (``make_optimizer``).
      grad: "bptt" (the explicit reverse scan) or "autodiff" (``jax.value_and_grad`` of ``loss``).
      stateful: start each chunk from the carried state (truncated BPTT) unless ``batch.reset``.
      input_dropout: probability of zeroing each input entry, scaled by 1/(1-p); the masks are a pure
        function of (seed, step, the sequence's index in the global batch) (``dropout_keep``), so a
        resumed run draws the same masks, on any number of devices and processes.
      output_dropout: the same for the top layer's merged states before the readout (the BPTT
        takes the mask as ``output_mask``).
      unroll: scan steps per loop iteration; None picks by backend (1 on a CPU, 8 on a GPU), as ``bptt``.
      recurrence: "scan", "pallas", "native" or "auto" (the fused kernels on a GPU where they apply), as ``bptt``.
      max_memory: a budget for the gradient program's temp memory (per shard), as ``bptt``'s; None: none.
      axis_name: when the step runs per shard (``parallel.make_sharded_train_step``), the mesh
        axis over which loss, gradients and dh_norms are averaged (``lax.pmean``) before the
        update; every shard then applies the same update. None on one device.
      jit: return the step jitted (True) or the plain function (for shard_map or tests).

    Returns:
      ``step(state, batch)`` where batch is a ``Batch`` (xs [T, B, N], targets, weights [T, B],
      reset [B], lengths [B] or None); returns ``(new_state, StepMetrics)``.
    """
    vjp.check_grad(grad)

    def step(state: TrainState, batch) -> tuple[TrainState, StepMetrics]:
        xs = jnp.asarray(batch.xs)
        key_in, key_out = jax.random.split(jax.random.fold_in(jax.random.key(seed), state.step))
        # The sequences' places in the global batch: a shard holds B consecutive ones (parallel.shard_batch)
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * xs.shape[1]
        index = first + jnp.arange(xs.shape[1])
        if input_dropout > 0.0:
            keep = dropout_keep(key_in, index, xs.shape[0], xs.shape[2], 1.0 - input_dropout)
            xs = jnp.where(keep, xs / (1.0 - input_dropout), 0.0)
        output_mask = None
        if output_dropout > 0.0:
            keep = dropout_keep(
                key_out, index, xs.shape[0], spec.merged_size(spec.num_layers - 1), 1.0 - output_dropout
            )
            output_mask = keep.astype(xs.dtype) / (1.0 - output_dropout)
        reset = jnp.asarray(batch.reset)
        if stateful:
            h0 = tuple(jnp.where(reset[:, None], 0.0, h) for h in state.carry)
        else:
            h0 = tuple(jnp.zeros_like(h) for h in state.carry)
        h0 = spec.public_states(h0)  # the carry holds one array per entry; the LSTM's calls take (h, c)
        kw = dict(
            weights=batch.weights,
            lengths=batch.lengths,
            h0=h0,
            output_mask=output_mask,
            unroll=unroll,
            recurrence=recurrence,
        )
        if grad == "bptt":
            # diagnostics: the dh_norms profile of the metrics
            value, grads, aux = bptt(
                state.params, spec, xs, batch.targets, diagnostics=True, max_memory=max_memory, **kw
            )
            assert aux.dh_norms is not None  # asked for with diagnostics=True
            dh_norms, h_last = aux.dh_norms, aux.h_last
        else:
            (value, h_last), grads = jax.value_and_grad(
                lambda p: loss_and_state(p, spec, xs, batch.targets, **kw),
                has_aux=True,
            )(state.params)
            dh_norms = jnp.full((xs.shape[0], len(h0)), jnp.nan, xs.dtype)
        if axis_name is not None:  # mean over shards = the global batch mean
            value, grads, dh_norms = jax.lax.pmean((value, grads, dh_norms), axis_name)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(
            state.step + 1,
            _tree_where(finite, params, state.params),
            _tree_where(finite, opt_state, state.opt_state),
            tuple(jnp.where(finite, jax.lax.stop_gradient(h), jnp.zeros_like(h)) for h in spec.internal_states(h_last)),
            jnp.where(finite, 0, state.nonfinite_in_row + 1),
            state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        return new, StepMetrics(value, grad_norm, dh_norms, finite)

    return jax.jit(step) if jit else step


class EvalSums(NamedTuple):
    div: Array  # [] sum over t, b of w Div
    weight: Array  # [] sum of w
    correct: Array  # [] sum of w * [argmax Y == D] (classification), 0 otherwise


def make_eval_step(spec: RNNSpec, *, unroll: int | None = None):
    """Jitted ``(params, h0, batch) -> (EvalSums, h_last)`` for evaluation (no gradients)."""

    @jax.jit
    def evaluate(params, h0, batch):
        xs = jnp.asarray(batch.xs)
        out = forward.forward(params, spec, xs, h0=spec.public_states(h0), lengths=batch.lengths, unroll=unroll)
        w = losses.effective_weights(jnp.asarray(batch.weights), batch.lengths, xs.shape[0], xs.shape[1], xs.dtype)
        divs = losses.divergence(spec.divergence, out.z2s, out.ys, batch.targets)
        if spec.divergence == "cross_entropy" and jnp.issubdtype(batch.targets.dtype, jnp.integer):
            correct = jnp.sum(w * (jnp.argmax(out.z2s, -1) == batch.targets))
        else:
            correct = jnp.zeros((), xs.dtype)
        return EvalSums(jnp.sum(w * divs), jnp.sum(w), correct), spec.internal_states(out.h_last)

    return evaluate


def evaluate(eval_step, params, spec: RNNSpec, batches, *, stateful: bool) -> dict:
    """Runs ``eval_step`` over fixed batches (state carried when stateful); returns per-weight means."""
    div = weight = correct = 0.0
    h = None
    for batch in batches:
        if h is None or not stateful:
            h = forward.default_h0(spec, batch.xs.shape[1], jnp.float32)
        sums, h = eval_step(params, h, batch)
        if not sums.div.is_fully_addressable:  # spans several processes: add on the host (arithmetic
            sums = EvalSums(*(_read(x) for x in sums))  # on such arrays from Python deadlocked in a trial)
        div, weight, correct = div + sums.div, weight + sums.weight, correct + sums.correct  # stays on device
    weight = max(float(_read(weight)), 1e-12)  # one read of the device at the end
    return {"loss": float(_read(div)) / weight, "accuracy": float(_read(correct)) / weight}


def _read(x):
    """A scalar's value; a replicated array spanning several processes is read from the local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
