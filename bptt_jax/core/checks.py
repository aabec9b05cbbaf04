"""Validation of public inputs.

Every error names the argument, what was seen and what was expected.

Shapes and dtypes are checked when a function is traced, so under ``jit`` (the public entry points
are jitted themselves) they cost nothing after the first call with a given input signature.

Values (class indices in [0, M), lengths in [0, T]) are a different matter: reading a device array
back to the host waits for the device. The policy (``check_values``):

- None (default): values are checked when the array already lives on the host (NumPy arrays,
  lists), which costs no device round trip; ``jax.Array`` inputs are not read back.
- True: every concrete array is read back and checked (one host sync per call).
- False: no value checks on the host.
Whatever the setting, the jitted computations also check the values in the graph
(``value_flags``): out-of-range targets or lengths turn DIV and every gradient into NaN instead
of a silently wrong number. Under an outer ``jit`` only that in-graph check applies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.core.params import RNNSpec, check_params

Array = jax.Array


def is_concrete(x) -> bool:
    """True when x holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def readable(x, check_values: bool | None) -> bool:
    """Whether the value checks read x: see the module docstring for the policy."""
    if check_values is False or not is_concrete(x):
        return False
    return bool(check_values) or not isinstance(x, jax.Array)


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def check_xs(spec: RNNSpec, xs) -> Array:
    """xs must be a float [T, B, N] array with T >= 1, B >= 1 and N = spec.input_size."""
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs: expected an array [T, B, N], got {type(xs).__name__}")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(
            f"xs: expected a floating dtype (float32 or float64), got {xs.dtype}; "
            "convert with xs.astype(jnp.float32) or one-hot encode integer symbols"
        )
    if xs.ndim != 3:
        raise ValueError(f"xs: expected rank 3 [T, B, N] (time-major), got shape {_shape(xs)}")
    t_len, batch, n = xs.shape
    if n != spec.input_size:
        raise ValueError(f"xs: expected feature size N={spec.input_size} (spec.input_size), got shape {_shape(xs)}")
    if t_len < 1 or batch < 1:
        raise ValueError(f"xs: expected T >= 1 and B >= 1, got shape {_shape(xs)}")
    return xs


def check_lengths(lengths, t_len: int, batch: int, check_values: bool | None = None) -> Array | None:
    """lengths must be None or integer [B] with values in [0, T] (values: see ``readable``)."""
    if lengths is None:
        return None
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    _integer("lengths", lengths)
    if _shape(lengths) != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},) = [B], got {_shape(lengths)}")
    _within_t("lengths", lengths, t_len, check_values)
    return jnp.asarray(lengths, dtype=jnp.int32)


def check_layer_lengths(name: str, value, t_len: int) -> None:
    """A layer's lengths (``seq_lengths``, ``length``; their shapes are the layer's to check): an
    integer dtype, and values in [0, T] where they live on the host (NumPy arrays, lists, Python
    ints: no device round trip, as ``check_values=None``); a ``jax.Array`` or a traced value is
    not read."""
    _integer(name, value if hasattr(value, "dtype") else np.asarray(value))
    _within_t(name, value, t_len, None)


def _integer(name: str, lengths) -> None:
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {lengths.dtype}")


def _within_t(name: str, lengths, t_len: int, check_values: bool | None) -> None:
    """Values in [0, T], where ``readable`` says they are read."""
    if readable(lengths, check_values):
        arr = np.asarray(lengths)
        if arr.size and (arr.min() < 0 or arr.max() > t_len):
            raise ValueError(f"{name}: expected values in [0, T={t_len}], got min {arr.min()} and max {arr.max()}")


def check_h0(spec: RNNSpec, h0, batch: int, dtype) -> tuple[Array, ...]:
    """h0 must be None or a tuple of L*D arrays [B, N1] (order layer * D + direction); for the LSTM
    each entry is an (h, c) pair of [B, N1] arrays. Returns the internal states [B, W]."""
    sizes = spec.state_sizes()
    if h0 is None:
        return tuple(jnp.zeros((batch, w), dtype) for w in spec.state_widths())
    if not isinstance(h0, (tuple, list)):
        raise ValueError(
            f"h0: expected a tuple of {len(sizes)} arrays (one per layer and direction), got {type(h0).__name__}"
        )
    if len(h0) != len(sizes):
        raise ValueError(
            f"h0: expected {len(sizes)} entries (layers={spec.num_layers} x directions="
            f"{spec.num_directions}), got {len(h0)}"
        )
    out = []
    for i, (entry, n1) in enumerate(zip(h0, sizes)):
        if spec.is_lstm:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(
                    f"h0[{i}]: the LSTM's state is an (h, c) pair of [B, N1] arrays, got "
                    f"{type(entry).__name__}" + (f" of shape {_shape(entry)}" if hasattr(entry, "shape") else "")
                )
            parts: tuple[tuple[str, Any], ...] = (("h", entry[0]), ("c", entry[1]))
        else:
            parts = (("", entry),)
        for part, h in parts:
            name = f"h0[{i}]" + (f" ({part})" if part else "")
            if _shape(h) != (batch, n1):
                raise ValueError(f"{name}: expected shape ({batch}, {n1}) = [B, N1], got {_shape(h)}")
            if not jnp.issubdtype(h.dtype, jnp.floating):
                raise TypeError(f"{name}: expected a floating dtype, got {h.dtype}")
        out.append(entry)
    return spec.internal_states(tuple(out))


def check_finite_tree(name: str, tree) -> None:
    """Raises ValueError if any concrete leaf of tree holds NaN or inf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in leaves:
        if is_concrete(leaf) and not bool(jnp.all(jnp.isfinite(leaf))):
            where = jax.tree_util.keystr(path)
            raise ValueError(f"{name}{where}: holds NaN or inf (check_finite=True)")


def check_finite_inputs(xs, h0, params) -> None:
    """Raises ValueError if xs, h0 (when given) or params hold NaN or inf (reads them: a host sync)."""
    check_finite_tree("xs", xs)
    if h0 is not None:
        check_finite_tree("h0", h0)
    check_finite_tree("params", params)


def host_checks(spec: RNNSpec, xs, targets, weights, lengths, check_values: bool | None):
    """What a public entry point checks before its jitted body (which checks shapes and dtypes when
    traced): the spec's type, and the values of targets and lengths per ``check_values`` (module
    docstring). Lists become NumPy arrays (host data, so their values are checked). Pass
    targets=None where there are none. Returns (lengths, weights)."""
    if not isinstance(spec, RNNSpec):
        raise TypeError(f"spec: expected an RNNSpec, got {type(spec).__name__}")
    if lengths is not None and not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    if weights is not None and not hasattr(weights, "dtype"):
        weights = np.asarray(weights)
    shape = getattr(xs, "shape", None)
    if check_values is False or shape is None or len(shape) != 3:
        return lengths, weights  # a wrong xs is named by the traced checks
    t_len, batch = shape[0], shape[1]
    if t_len == 0 or batch == 0:
        return lengths, weights  # an empty xs is named by the traced checks (no values to range-check)
    if lengths is not None and readable(lengths, check_values):
        lengths = check_lengths(lengths, t_len, batch, check_values)
    if targets is not None and hasattr(targets, "dtype") and readable(targets, check_values):
        check_targets(spec, targets, None, t_len, batch, check_values)
    return lengths, weights


def check_inputs(
    params, spec: RNNSpec, xs, h0, lengths, *, check_finite: bool = False, check_values: bool | None = None
):
    """Checks params, xs, h0 and lengths; returns (xs, h0 with zeros filled in, lengths).

    xs and h0 come back in the dtype the recurrence computes in: the promotion of xs's and the
    layers' dtypes, as Flax promotes a cell's inputs and parameters (float32 inputs into float64
    layers compute in float64; the state a scan carries has one dtype)."""
    if not isinstance(spec, RNNSpec):
        raise TypeError(f"spec: expected an RNNSpec, got {type(spec).__name__}")
    check_params(params, spec)
    xs = check_xs(spec, xs)
    t_len, batch, _ = xs.shape
    lengths = check_lengths(lengths, t_len, batch, check_values)
    dtype = jnp.result_type(
        xs.dtype, *(a.dtype for a in jax.tree_util.tree_leaves((params.layers, params.reverse_layers)))
    )
    xs = xs.astype(dtype)
    h0 = tuple(jax.tree_util.tree_map(lambda a: a.astype(dtype), check_h0(spec, h0, batch, dtype)))
    if check_finite:
        check_finite_inputs(xs, h0, params)
    return xs, h0, lengths


def check_targets(spec: RNNSpec, targets, weights, t_len: int, batch: int, check_values: bool | None = None):
    """Checks targets D and weights w against the divergence; returns them as arrays.

    cross_entropy: integer class indices [T, B] in [0, M) or probabilities [T, B, M];
    squared_error and binary_cross_entropy: float [T, B, M]. weights: None or float [T, B].
    """
    m = spec.output_size
    if not hasattr(targets, "shape") or not hasattr(targets, "dtype"):
        raise TypeError(f"targets: expected an array, got {type(targets).__name__}")
    if spec.divergence == "cross_entropy" and jnp.issubdtype(targets.dtype, jnp.integer):
        if _shape(targets) != (t_len, batch):
            raise ValueError(
                f"targets: expected integer class indices of shape ({t_len}, {batch}) = [T, B], got {_shape(targets)}"
            )
        if readable(targets, check_values):
            arr = np.asarray(targets)
            if arr.min() < 0 or arr.max() >= m:
                raise ValueError(
                    f"targets: class indices must lie in [0, M={m}), got min {arr.min()} and max {arr.max()}"
                )
    else:
        if not jnp.issubdtype(targets.dtype, jnp.floating):
            raise TypeError(
                f"targets: expected a floating dtype for divergence {spec.divergence!r}, got {targets.dtype}"
            )
        if _shape(targets) != (t_len, batch, m):
            raise ValueError(f"targets: expected shape ({t_len}, {batch}, {m}) = [T, B, M], got {_shape(targets)}")
    if weights is not None:
        if not hasattr(weights, "shape"):
            weights = jnp.asarray(weights)
        if _shape(weights) != (t_len, batch):
            raise ValueError(f"weights: expected shape ({t_len}, {batch}) = [T, B], got {_shape(weights)}")
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise TypeError(f"weights: expected a floating dtype, got {weights.dtype}")
    return targets, weights


def check_output_mask(spec: RNNSpec, mask, t_len: int, batch: int):
    """output_mask must be None or float [T, B, N_top] (N_top: the top layer's merged size)."""
    if mask is None:
        return None
    want = (t_len, batch, spec.merged_size(spec.num_layers - 1))
    if _shape(mask) != want:
        raise ValueError(f"output_mask: expected shape {want} = [T, B, N_top], got {_shape(mask)}")
    if not jnp.issubdtype(mask.dtype, jnp.floating):
        raise TypeError(f"output_mask: expected a floating dtype, got {mask.dtype}")
    return mask


def value_flags(spec: RNNSpec, targets: Array, lengths: Array | None, t_len: int) -> Array:
    """In-graph: a scalar bool, True when integer targets leave [0, M) or lengths leave [0, T].

    No host sync; the jitted computations turn their outputs into NaN where it is True.
    """
    bad = jnp.zeros((), bool)
    if spec.divergence == "cross_entropy" and jnp.issubdtype(targets.dtype, jnp.integer):
        bad = bad | jnp.any(targets < 0) | jnp.any(targets >= spec.output_size)
    if lengths is not None:
        bad = bad | jnp.any(lengths < 0) | jnp.any(lengths > t_len)
    return bad


def poison(bad: Array, tree):
    """Every floating leaf of tree replaced by NaN where ``bad`` (a scalar bool) is True."""

    def f(a):
        if a is None or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jnp.where(bad, jnp.nan, a)

    return jax.tree_util.tree_map(f, tree)


def entry_checks(spec: RNNSpec, xs, targets, weights, lengths, h0, params, *, check_values, check_finite: bool):
    """Everything a public entry point checks on the host, once, before its jitted body:
    ``host_checks`` and, with ``check_finite``, ``check_finite_inputs``. Returns (lengths, weights)."""
    lengths, weights = host_checks(spec, xs, targets, weights, lengths, check_values)
    if check_finite:
        check_finite_inputs(xs, h0, params)
    return lengths, weights


class Checked(NamedTuple):
    """A call's arrays after ``traced_checks``: shapes and dtypes checked, h0 filled in."""

    xs: Array  # [T, B, N]
    targets: Array  # [T, B] or [T, B, M]
    weights: Array | None  # [T, B]
    lengths: Array | None  # [B]
    h0: tuple[Array, ...]  # L*D internal states [B, W]
    output_mask: Array | None  # [T, B, N_top]
    bad: Array  # scalar bool: out-of-range values (``value_flags``); the results are poisoned with it


def traced_checks(params, spec: RNNSpec, xs, targets, weights, lengths, h0, output_mask) -> Checked:
    """Everything the jitted body of ``loss`` and ``bptt`` checks, once per input signature."""
    xs, h0, lengths = check_inputs(params, spec, xs, h0, lengths)
    t_len, batch = xs.shape[0], xs.shape[1]
    targets, weights = check_targets(spec, targets, weights, t_len, batch)
    output_mask = check_output_mask(spec, output_mask, t_len, batch)
    return Checked(xs, targets, weights, lengths, h0, output_mask, value_flags(spec, targets, lengths, t_len))
