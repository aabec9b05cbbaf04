"""``max_memory``: the fastest plan whose compiled temp memory fits a budget.

The plans, fastest first as measured on the benchmark machines (docs/results/benchmarks.md, "Gated
cells: the memory settings"): the plan ``plan.resolve`` gives (the rules', or one tuned on this
machine), then a gated cell's gates recomputed instead of stored, then smaller time blocks, then
checkpoint segments (networks without an output mask: about one more forward pass, two or more
for a bidirectional one; memory ~ T/k + k), then two levels of nested segments (memory ~ T/k1 +
k1/k2 + k2). Each candidate is first held against a lower bound read from the shapes -- the
arrays it must keep across the whole sequence (the states h(t), c(t), and the gates where stored;
only the segments' boundary states with segments) -- and, when that fits, compiled: its memory
analysis (``temp_size_in_bytes``) decides. So the budget is met by the compiled program, not by a
model of it; a plan that does not fit is never run. When none fits, the error names the smallest
budget that would: the leanest candidate's compiled temp memory.

A budget counts XLA's temporary buffers of the gradient's program: the arguments (parameters,
inputs, targets) and the outputs (gradients) are not temp memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax.numpy as jnp

from bptt_jax.core import cells, native, plan
from bptt_jax.core.params import RNNSpec

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MIN_BLOCK = 1  # the smallest time block tried (the block matmuls then have B rows)


def parse_memory(value) -> int:
    """Bytes from ``value``: a positive int (bytes) or a string such as "512MiB", "1.5 GiB", "2e9",
    "800MB" (KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000). Raises ValueError naming
    ``max_memory``."""
    if isinstance(value, bool):
        raise ValueError(f"max_memory: expected bytes (an int) or a size such as '512MiB', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"max_memory: expected a positive number of bytes, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            size = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if size >= 1:
                return int(size)
    raise ValueError(
        f"max_memory: expected bytes (an int) or a size such as '512MiB', '1.5GiB', '800MB', got {value!r}"
    )


def temp_bytes(compiled) -> int:
    """XLA's temp memory of a compiled program (``memory_analysis().temp_size_in_bytes``)."""
    mem = compiled.memory_analysis()
    if mem is None or getattr(mem, "temp_size_in_bytes", None) is None:
        raise ValueError("max_memory: this backend reports no memory analysis of compiled programs")
    return int(mem.temp_size_in_bytes)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def stored_bytes(options: plan.Options, spec: RNNSpec, t_len: int, batch: int, dtype) -> int:
    """A lower bound on the temp memory of ``options`` (all choices explicit): what the plan keeps
    across the whole sequence. States: T' steps of every (layer, direction) (with segments: T'/k
    boundary states plus one segment's k steps); a gated cell's stored gates: T' steps of CACHE*N1
    (the compiled kernel's: native.cache_width*N1, the GRU's without V_n where its per-step matmul
    has one thread)."""
    item = jnp.dtype(dtype).itemsize
    cell = cells.get(spec.cell)
    levels = plan.segment_levels(options.checkpoint_every)
    unit = (levels[0] if levels else None) or options.block_size or t_len
    padded = math.ceil(t_len / unit) * unit
    widths = spec.state_widths()  # per (layer, direction): N1, or 2 N1 for the LSTM's (h, c)
    per_step = batch * sum(widths) * item
    if levels:  # the boundaries of every level (T'/k1 + k1/k2 + ...) and the innermost segment's steps
        outer = (padded, *levels)
        return (sum(a // b for a, b in zip(outer, outer[1:])) + levels[-1]) * per_step
    total = padded * per_step
    if options.gates == "store" and cell.CACHE:
        if options.recurrence == "native":  # each layer's kernel call decides for its own N1
            cached = sum(batch * native.cache_width(spec.cell, batch, n1) * n1 for n1 in spec.hidden_sizes)
        else:
            cached = batch * cell.CACHE * sum(spec.hidden_sizes)
        total += padded * cached * spec.num_directions * item
    return total


def _near_divisor(t_len: int, c: int) -> int:
    near = [d for d in range(max(c // 2, 1), min(2 * c, t_len) + 1) if t_len % d == 0]
    return min(near, key=lambda d: abs(d - c), default=max(c, 1))


def candidates(first: plan.Options, spec: RNNSpec, t_len: int, batch: int, segments_ok: bool) -> list[plan.Options]:
    """The plans to try under a budget, fastest first (see the module's docstring); ``first`` has
    every choice explicit."""
    out = [first]
    block = first.block_size or t_len
    gated = cells.get(spec.cell).CACHE > 0
    lean = dataclasses.replace(first, gates="recompute") if gated else first
    out.append(lean)
    c = block
    while c > MIN_BLOCK:
        c = _near_divisor(t_len, max(c // 2, MIN_BLOCK))
        out.append(dataclasses.replace(lean, block_size=c))
        if c <= max(-(-16 // max(batch, 1)), MIN_BLOCK):  # below 16 rows a block only costs time
            break
    if segments_ok and first.checkpoint_every is None and t_len >= 4:
        root = math.isqrt(t_len)
        for k in (t_len // 4, t_len // 16, 2 * root, root, max(root // 2, 2)):
            k = _near_divisor(t_len, max(k, 2))
            if 1 < k < t_len:
                inner = plan.segment_block(spec, k, batch, lean.recurrence, block)  # the block inside
                seg = dataclasses.replace(lean, gates="recompute", checkpoint_every=k, block_size=inner)
                out.append(seg)
        if t_len >= 64:  # nested segments: ~3 T^(1/3) states, more recomputation
            k1 = _near_divisor(t_len, round(t_len ** (2 / 3)))
            root = math.isqrt(k1)  # k2: the divisor of k1 nearest its square root (each level divides the one above)
            k2 = min((d for d in range(2, k1) if k1 % d == 0), key=lambda d: abs(d - root), default=1)
            if 1 < k2 < k1 < t_len:
                nested = (k1, k2)
                inner = plan.segment_block(spec, nested, batch, lean.recurrence, block)
                out.append(dataclasses.replace(lean, gates="recompute", checkpoint_every=nested, block_size=inner))
    unique: list[plan.Options] = []
    for o in out:
        if o not in unique:
            unique.append(o)
    return unique


def choose(
    first: plan.Options,
    spec: RNNSpec,
    t_len: int,
    batch: int,
    dtype,
    budget: int,
    segments_ok: bool,
    measure: Callable[[plan.Options], int],
    hint: str | None = None,
    allowed: Callable[[plan.Options], bool] | None = None,
) -> plan.Options:
    """The first of ``candidates`` whose compiled temp memory (``measure``) is at most ``budget``
    bytes; a candidate whose lower bound (``stored_bytes``) exceeds the budget is not compiled.
    When none fits, every candidate is compiled and the ValueError gives the smallest compiled temp
    memory among them: the smallest budget that would fit (``hint``: what the message adds about
    the plans left out). ``allowed``: only the candidates it accepts are tried."""
    tried = [o for o in candidates(first, spec, t_len, batch, segments_ok) if allowed is None or allowed(o)]
    measured: dict[plan.Options, int] = {}
    for o in tried:
        if stored_bytes(o, spec, t_len, batch, dtype) > budget:
            continue
        measured[o] = measure(o)
        if measured[o] <= budget:
            return o
    for o in tried:
        if o not in measured:
            measured[o] = measure(o)
    leanest = min(tried, key=lambda o: measured[o])
    need = measured[leanest]
    if hint is None:
        hint = "" if segments_ok else " (checkpoint segments, the leanest plans, cannot be combined with output_mask)"
    raise ValueError(
        f"max_memory={format_bytes(budget)}: no plan of this gradient fits; the leanest "
        f"(block_size={leanest.block_size}, gates={leanest.gates!r}, checkpoint_every={leanest.checkpoint_every}) "
        f"needs {format_bytes(need)} ({need} bytes) of temp memory: give at least that{hint}"
    )
