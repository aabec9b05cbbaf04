"""How the exact gradient is computed: the options a caller asks for and the plan they resolve to.

None of this changes the gradient's value; every plan gives the same gradients to rounding (the
property tests draw plans). ``Options`` is what a caller asks for (``bptt``'s keywords, validated
once, frozen and hashable: the jitted entry's static argument); ``resolve`` turns it into a ``Plan``
for the shapes at hand, by the rules below, when the call is traced:

- the time-block size C (``auto_block_size``),
- whether a gated cell's forward pass keeps its gates or the backward pass recomputes them
  (``resolve_gates``),
- the scan's unroll (``forward.resolve_unroll``) and scans or kernels (``kernels.resolve``),
- checkpoint segments of k steps (``checkpoint_every``).

A plan measured faster on this machine by ``bptt_jax.tune`` overrides the rules: ``resolve`` reads
the on-disk cache (``plancache``) when the call is traced, for the choices the caller left to it.

Every tuning constant cites the measurement it came from (docs/results/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.core import cells, forward, kernels, native, plancache, precision
from bptt_jax.core.params import RNNSpec

# The automatic block size (``auto_block_size``), measured on a 2-core CPU (docs/results/benchmarks.md):
# below WHOLE_ELEMENTS elements in a [T, B, width] buffer the whole sequence is one block (its
# buffers fit in cache and one block runs fastest); above it, blocks of about BLOCK_ELEMENTS elements
# and at least MIN_BLOCK_ROWS rows (C*B) keep the block buffers cache-sized while the block's
# matmuls still have enough rows to run near full speed.
WHOLE_ELEMENTS = 2**20
BLOCK_ELEMENTS = 2**17
MIN_BLOCK_ROWS = 512
# On a GPU the blocks trade speed for memory the other way: measured on an H100 (docs/results/benchmarks.md,
# "On a GPU"), the whole sequence as one block ran 1.1-1.6x faster than the CPU's cache-sized blocks
# at every benchmark shape where the two differ (up to T*B*width = 2^24), at up to 3.3x the temp
# memory (still below jax.grad's). Up to GPU_WHOLE_ELEMENTS the whole sequence is one block there;
# above it (not measured), blocks of about GPU_BLOCK_ELEMENTS.
GPU_WHOLE_ELEMENTS = 2**25
GPU_BLOCK_ELEMENTS = 2**23
# Gated cells: keep the forward's gate activations ("store") instead of recomputing them per block in
# the backward pass ("recompute") while all layers' caches together hold at most STORE_ELEMENTS
# elements (T * B * CACHE * N1 summed over layers and directions: 64 MiB in float32) and at least
# the cell's STORE_FROM. Measured on the 2-core CPU (docs/results/benchmarks.md, "Gated cells: the latest
# run"): storing ran up to 1.22x faster than recomputing at the larger benchmark shapes (0.97-1.22x),
# for about 2-4x the temp memory (still about half of jax.grad's); above the cap memory comes first.
STORE_ELEMENTS = 2**24
# With the cells' compiled kernel (recurrence "native") the automatic block is the whole sequence
# while a gated cell's [T, B, G N1] pre-activations hold at most NATIVE_WHOLE_ELEMENTS elements
# (T * B * G * N1, the widest layer): measured on a 2-core Xeon with AVX-512 (2026-12-05,
# benchmarks/results/native_blocks_spr.md), the whole sequence as one block, the gates kept, ran
# 1.00-1.44x the scans' default plan at the gated benchmark shapes (up to 2^23.6 such elements;
# geometric means GRU 1.18x (1.24x in a first run), LSTM 1.30x), the kernel in the scans'
# cache-sized blocks 0.93-1.30x: each block's call repacks Wh and the blocks' stored gates are
# copied into the sequence's; one call keeps them in place. Its temp memory is the larger: up to
# 1.7x the scans' (the gates' gradients are kept for all T at once: the LSTM's 0.68-0.70x the
# smallest jax.grad contender's, the GRU's 0.82-0.85x since its reverse call sums dWh itself,
# benchmarks/results/bptt_speed_gated_s17_huge_spr.md). With the gates recomputed the scans'
# blocks stay (one block would recompute every gate at once).
NATIVE_WHOLE_ELEMENTS = 2**24
# With a 16-bit compute dtype, where float32 runs the whole sequence as one block: a tenth of T from
# HALF_TENTH_ELEMENTS elements of [T, B, width] up, a quarter below (``half_precision_block``).
HALF_TENTH_ELEMENTS = 2**16
GATES = ("auto", "store", "recompute")


def _positive_int_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


def _segment_levels_checked(value):
    """``checkpoint_every`` as Options keeps it: None, an int k, or a tuple of two or more levels,
    each a positive int dividing the one before (a list is taken as a tuple; one level is its int)."""
    if isinstance(value, (list, tuple)):
        levels = tuple(value)
        bad = not levels or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in levels)
        if bad or any(a <= b or a % b for a, b in zip(levels, levels[1:])):
            raise ValueError(
                "checkpoint_every: expected a positive int, None, or a tuple of positive ints each dividing "
                f"the one before (nested segments, e.g. (1000, 50)), got {value!r}"
            )
        return levels if len(levels) > 1 else levels[0]
    _positive_int_or_none("checkpoint_every", value)
    return value


def segment_levels(checkpoint_every) -> tuple[int, ...]:
    """The segment lengths, outermost first: () without segments, (k,) for an int."""
    if checkpoint_every is None:
        return ()
    return checkpoint_every if isinstance(checkpoint_every, tuple) else (checkpoint_every,)


@dataclasses.dataclass(frozen=True)
class Options:
    """What a caller asks of the explicit BPTT (``bptt``'s keywords of the same names), checked here.

    Frozen and hashable: the static argument of the jitted entry. None and "auto" leave the choice
    to ``resolve``'s rules.

    Attributes:
      generic: dDIV/dZ2 by the generic path (dDIV/dY times f2's Jacobian) instead of the closed form.
      unroll: ``lax.scan``'s unroll; None: by backend.
      block_size: C, steps per time block; None: ``auto_block_size``.
      checkpoint_every: k, steps per recomputed segment; a tuple (k1, k2, ...): nested segments,
        each level's segment cut into segments of the next (each k dividing the one before);
        None: no segments. A one-element tuple is that int.
      diagnostics: also return ||dDIV/dh(t)|| (``BPTTAux.dh_norms``).
      with_dxs: also return dDIV/dX (``BPTTAux.dxs``).
      recurrence: "scan", "pallas", "native" (the cells' compiled CPU kernel, ``bptt_jax.core.native``)
        or "auto".
      gates: "store", "recompute" or "auto" (gated cells).
    """

    generic: bool = False
    unroll: int | None = None
    block_size: int | None = None
    checkpoint_every: int | tuple[int, ...] | None = None
    diagnostics: bool = False
    with_dxs: bool = False
    recurrence: str = "auto"
    gates: str = "auto"

    def __post_init__(self):
        _positive_int_or_none("block_size", self.block_size)
        object.__setattr__(self, "checkpoint_every", _segment_levels_checked(self.checkpoint_every))
        if self.unroll is not None:
            forward.resolve_unroll(self.unroll)  # a bad value raises, naming unroll
        if self.recurrence not in kernels.RECURRENCES:
            raise ValueError(f"recurrence: expected one of {list(kernels.RECURRENCES)}, got {self.recurrence!r}")
        if self.gates not in GATES:
            raise ValueError(f"gates: expected one of {list(GATES)}, got {self.gates!r}")

    def check(self, spec: RNNSpec, with_output_mask: bool) -> None:
        """What the options cannot do for this network: raises ValueError naming the option."""
        if self.checkpoint_every is not None and with_output_mask:
            raise ValueError("checkpoint_every: cannot be combined with output_mask")
        resolve_gates(self.gates, spec, 1, 1, self.checkpoint_every)  # an impossible "store" fails here


class Plan(NamedTuple):
    """``Options`` resolved for one network and input shape: what the backward functions read."""

    block: int  # C, steps per time block (a divisor of every padded run the blocks cover)
    store: bool  # a gated cell's forward keeps its gates for the backward pass
    segment: int | tuple[int, ...] | None  # k, steps per checkpoint segment (a tuple: nested), or None
    unroll: int  # lax.scan's unroll
    recurrence: str  # "scan", "pallas" or "native"
    generic: bool = False
    with_norms: bool = False  # Options.diagnostics
    with_dxs: bool = False


def auto_block_size(t_len: int, batch: int, width: int, backend: str | None = None, half: bool = False) -> int:
    """The block size C used when ``block_size`` is None.

    Args:
      t_len, batch: T and B.
      width: the widest per-step feature size (the largest of N1 per direction and M).
      backend: "cpu", "gpu", ...; None: JAX's default backend.
      half: a 16-bit compute dtype (``half_precision_block``): the block before the divisor
        search below is halved, and a whole-sequence block becomes a tenth of T on the CPU from
        HALF_TENTH_ELEMENTS elements, a quarter below them and on a GPU.

    Returns:
      T when T*B*width <= WHOLE_ELEMENTS (GPU_WHOLE_ELEMENTS on a GPU); otherwise about
      max(MIN_BLOCK_ROWS / B, BLOCK_ELEMENTS / (B * width)) steps (GPU_BLOCK_ELEMENTS on a GPU),
      capped at T, preferring a divisor of T within a factor of two of that (no padding steps then).
    """
    batch, width = max(batch, 1), max(width, 1)
    on_gpu = (backend or jax.default_backend()) == "gpu"
    whole, block = (GPU_WHOLE_ELEMENTS, GPU_BLOCK_ELEMENTS) if on_gpu else (WHOLE_ELEMENTS, BLOCK_ELEMENTS)
    elements = t_len * batch * width
    tenth = not on_gpu and elements >= HALF_TENTH_ELEMENTS  # measured on the CPU only
    if elements <= whole:
        return half_precision_block(t_len, t_len, tenth) if half else t_len
    c = max(-(-MIN_BLOCK_ROWS // batch), block // (batch * width), 1)
    if c >= t_len:
        return half_precision_block(t_len, t_len, tenth) if half else t_len
    c = max(c // 2, 1) if half else c
    for delta in range(c):  # nearest divisor of T in [c/2, 2c]
        for cand in (c - delta, c + delta):
            if c // 2 <= cand <= 2 * c and 1 <= cand <= t_len and t_len % cand == 0:
                return cand
    return c


def resolve_gates(
    gates: str, spec: RNNSpec, t_len: int, batch: int, checkpoint_every: int | tuple[int, ...] | None, dtype=None
) -> bool:
    """Whether the forward pass keeps the gates (True) or the backward pass recomputes them.

    "store" and "recompute" as asked; "auto" stores while the caches of every layer and direction
    hold at most STORE_ELEMENTS elements and at least the cell's STORE_FROM (the GRU's 2^16: below
    it recomputing ran faster, the LSTM's 0). Only gated cells without ``checkpoint_every`` can
    store across the sequence (the Elman cell has no gates; with segments the states themselves
    are recomputed, and the segment being differentiated keeps its own gates by this rule for k
    steps, whatever ``gates`` says): otherwise "auto" recomputes and "store" raises. With a 16-bit
    compute ``dtype`` the gates are recomputed ("store" raises):
    kept, they would be kept in 16 bits, where recomputing gives the float32 values the forward pass
    used (measured, tests/test_precision.py: stored in bfloat16, the LSTM's error against float64
    reached 1.75x jax.grad's; recomputed, at most 1.1x).
    """
    if gates not in GATES:
        raise ValueError(f"gates: expected one of {list(GATES)}, got {gates!r}")
    cell = cells.get(spec.cell)
    cache = cell.CACHE
    can = cache > 0 and checkpoint_every is None
    half = dtype is not None and precision.is_half(dtype)
    if gates == "store" and (half or not can):
        why = "the Elman cell has no gates" if cache == 0 else "checkpoint_every recomputes its segments"
        if half and can:
            why = (
                f"the gates would be kept in {jnp.dtype(dtype).name}, where sigma'(.) = s (1 - s) loses its digits "
                "as a gate saturates; with a 16-bit compute dtype the gates are recomputed (gates='auto')"
            )
        raise ValueError(f"gates='store': {why}")
    if gates == "auto":
        elements = t_len * batch * cache * sum(spec.hidden_sizes) * spec.num_directions
        return can and cell.STORE_FROM <= elements <= STORE_ELEMENTS and not half
    return gates == "store"


def native_whole(spec: RNNSpec, t_len: int, batch: int, store: bool) -> bool:
    """Whether the compiled kernel's automatic block is the whole sequence: a gated cell whose gates
    are kept (``store``; recomputed, they are recomputed block by block, and one block would hold
    them all at once), up to ``NATIVE_WHOLE_ELEMENTS``."""
    cell = cells.get(spec.cell)
    fits = t_len * batch * cell.GATES * max(spec.hidden_sizes) <= NATIVE_WHOLE_ELEMENTS
    return store and cell.CACHE > 0 and fits


def segment_block(spec: RNNSpec, checkpoint_every, batch: int, recurrence: str, block: int, dtype=None) -> int:
    """The time block inside checkpoint segments: ``block``, at most the innermost segment's k steps,
    or that whole segment where the compiled kernel runs a gated cell whose segment keeps its gates
    (``segments``: a bidirectional stack's always, a unidirectional one's by ``resolve_gates("auto")``
    for k steps) as the kernel's whole-sequence rule would for a sequence of k steps
    (``native_whole``), and a bidirectional stack of Elman cells' up to ``NATIVE_WHOLE_ELEMENTS``
    elements of [k, B, N1]. A bidirectional LSTM (B 16, N 64, N1 128) in segments of 2,000 steps
    ran 277 us per step in blocks of 32 and 192 in whole segments, where its default plan without
    segments took 201 (T = 20,000, 2026-12-05; benchmarks/results/scaling_*_s21_spr.md); the Elman
    cell (2026-12-06, model-207 Xeon, a script not committed) 127.2 us in blocks of 64 and 87.6 in
    whole segments at the same temp memory (94.2 MiB; without segments 87.2 us in 1.07 GiB).
    Unidirectional, whole segments ran it 1.39x faster at 2.1x the temp memory (25.8 -> 55.0 MiB):
    not taken (``checkpoint_every`` is asked for its memory)."""
    k = segment_levels(checkpoint_every)[-1]
    kept = cells.get(spec.cell).CACHE > 0 and not (dtype is not None and precision.is_half(dtype))
    if not spec.bidirectional:
        kept = resolve_gates("auto", spec, k, batch, None, dtype)
    elman = spec.cell == "elman" and spec.bidirectional and k * batch * max(spec.hidden_sizes) <= NATIVE_WHOLE_ELEMENTS
    return k if recurrence == "native" and (elman or native_whole(spec, k, batch, kept)) else min(block, k)


def elman_kernel_block(spec: RNNSpec, t_len: int, batch: int, block: int) -> int:
    """The Elman kernel's time block where the rules choose it: ``block`` (the scans' rule), or where
    that holds fewer than ``native.KERNEL_SUM_ROWS`` rows (C B) and the kernel's per-step matmul has
    one thread, the nearest divisor of T from that many rows up to twice as many, so that each
    reverse call sums dW1, dW11 and db1 itself on its helper thread beside the steps
    (``native.sums_in_kernel``) instead of leaving them to XLA's dots after the steps. On a 2-core
    Xeon (family 6, model 207; 2026-12-06): at (200, 64, 128, 256, 128) blocks of 20 steps ran the
    whole ``bptt`` call 1.17x the scans' time where the scans' 8 ran 1.02x, at (1000, 16, 64, 128,
    64) 100 steps 1.23x where 50 ran 1.03x, at 1.07-1.11x the scans' temp memory
    (``benchmarks/results/native_blocks_elman_rows_s23_emr.md``)."""
    need = -(-native.KERNEL_SUM_ROWS // max(batch, 1))
    if block >= need or not native.one_thread("elman", batch, max(spec.hidden_sizes)):
        return block
    for c in range(need, min(2 * need, t_len) + 1):
        if t_len % c == 0:
            return c
    return block


def block_width(spec: RNNSpec) -> int:
    """The widest per-step buffer of a block: G*N1 (a cell's gates; N1 for the Elman cell) or M."""
    return max(max(spec.hidden_sizes) * cells.get(spec.cell).GATES, spec.output_size)


def half_precision_block(t_len: int, auto: int, tenth: bool) -> int:
    """The automatic block with a 16-bit compute dtype: half of ``auto``; where ``auto`` is the whole
    sequence, a tenth of T with ``tenth`` (``auto_block_size``: on the CPU, from HALF_TENTH_ELEMENTS
    elements of [T, B, width]), else a quarter of it (a divisor of T within a factor of two below it
    where there is one).

    The stored states are halved there while a block's buffers stay float32, so the block shrinks
    too: measured with bfloat16 at the gated benchmark shapes over 1 MiB (2026-12-04, after the scans
    stopped keeping float32 copies), temp memory over float32's default with the float32 block and
    with half of it: GRU 0.18-0.52x and 0.14-0.32x, LSTM 0.25-0.60x and 0.21-0.38x, Elman 0.68-1.61x
    and 0.56-0.95x. Where float32 runs T as one block (the Elman cell at (100, 32, 64, 128, 64)) a
    block's float32 work arrays are as long as the sequence: half of T kept 0.95x, a quarter 0.54x
    (0.30x at T/10, at 1.14x a quarter's time; 2026-12-04, same machine). ``auto_block_size(...,
    half=True)`` halves the float32 block before it is moved to a divisor of T (which can move it
    up: 8 -> 10 at T = 100), so that at (100, 64, 256, 512, 256) the block is 4, not 5: the Elman
    cell's temp memory 0.57x float32's instead of 0.63x, at 0.98x the time (2026-12-04).

    Since float32 runs the Elman cell's compiled kernel by default (float32 only; bfloat16 runs the
    scans), its temp memory at (100, 32, 64, 128, 64) is 4.7 MiB where the scans' was 7.8, and the
    quarter kept 0.88x of it; a tenth of T keeps 0.47x at 1.03x the quarter's time, a fifth 0.74x
    (Xeon model 207, 2026-12-06, ``benchmarks/half_blocks.py``, results/half_blocks_s27_emr.md).
    Below HALF_TENTH_ELEMENTS the sequence's buffers are small beside the fixed ones (the weights'
    16-bit copies): at (50, 1, 32, 64, 32) blocks of 5 and 2 steps kept the same temp memory as the
    quarter's 10, every cell, and ran 1.05-1.20x and 1.41-1.43x its time; the quarter stays there,
    and on a GPU (not measured; there one block ran fastest, ``GPU_WHOLE_ELEMENTS``). Both
    HALF_TENTH_ELEMENTS and the tenth are constants from that one machine, not measured where it runs."""
    whole = 10 if tenth else 4
    c = max(min(auto, t_len) // (whole if auto >= t_len else 2), 1)
    return next((d for d in range(c, max(c // 2, 1) - 1, -1) if t_len % d == 0), c)


TUNABLE = ("block_size", "gates", "unroll", "recurrence")  # the choices ``bptt_jax.tune`` measures


def _left_auto(options: Options, field: str) -> bool:
    value = getattr(options, field)
    return value in (None, "auto")


ENTRIES = ("bptt", "rnn_states")  # the entry points whose plans are tuned (``bptt_jax.tune``, ``tune_states``)


def cache_key(
    options: Options, spec: RNNSpec, t_len: int, batch: int, dtype, budget: int | None = None, entry: str = "bptt"
) -> str:
    """The plan cache's key for ``options`` at this shape: the work (what the options change
    besides the plan), the choices the caller fixed and the memory budget (bytes) are part of it,
    and the entry point (``rnn_states``' forward + backward is another program than ``bptt``'s)."""
    if entry not in ENTRIES:
        raise ValueError(f"entry: expected one of {list(ENTRIES)}, got {entry!r}")
    work: dict[str, object] = {
        "generic": options.generic,
        "diagnostics": options.diagnostics,
        "with_dxs": options.with_dxs,
        "checkpoint_every": options.checkpoint_every,
        "fixed": {f: getattr(options, f) for f in TUNABLE if not _left_auto(options, f)},
        "max_memory": budget,
    }
    if entry != "bptt":  # bptt's keys as they were (entries tuned before stay valid)
        work["entry"] = entry
    return plancache.key(spec, t_len, batch, dtype, work)


def tuned_entry(
    options: Options, spec: RNNSpec, t_len: int, batch: int, dtype, budget: int | None = None, entry: str = "bptt"
):
    """The cached tuned plan for this call (a dict), or None (nothing left to choose, no entry, no cache)."""
    if budget is None and not any(_left_auto(options, f) for f in TUNABLE):
        return None
    return plancache.lookup(cache_key(options, spec, t_len, batch, dtype, budget, entry), spec, t_len)


def fill_tuned(options: Options, tuned: dict, spec: RNNSpec, t_len: int, batch: int, dtype) -> Options:
    """``options`` with the choices it left open taken from a tuned entry (``tuned_entry``), except
    those this network cannot run here (gates it cannot store, kernels it cannot use: the rules
    then choose them)."""
    fill = {f: tuned[f] for f in TUNABLE if _left_auto(options, f)}
    if fill.get("gates") == "store":
        try:
            resolve_gates("store", spec, t_len, batch, options.checkpoint_every, dtype)
        except ValueError:
            fill.pop("gates")  # cannot store here (the rules then choose)
    if fill.get("recurrence") in ("pallas", "native"):
        try:
            kernels.resolve(fill["recurrence"], spec.hidden_sizes, dtype, cell=spec.cell)
        except ValueError:
            fill.pop("recurrence")
    return dataclasses.replace(options, **fill)


def explicit(options: Options, spec: RNNSpec, t_len: int, batch: int, dtype) -> Options:
    """``options`` with every choice the plan makes written out (as ``resolve`` resolves them, the
    plan cache included): the same plan, asked for explicitly."""
    p = resolve(options, spec, t_len, batch, dtype)
    return dataclasses.replace(
        options,
        block_size=p.block,
        gates="store" if p.store else "recompute",
        unroll=p.unroll,
        recurrence=p.recurrence,
    )


def resolve(options: Options, spec: RNNSpec, t_len: int, batch: int, dtype, use_cache: bool = True) -> Plan:
    """The plan for ``options`` at this network and shape (run when the jitted entry is traced):
    the caller's choices, then a tuned plan from the cache (``use_cache``), then the rules."""
    tuned = tuned_entry(options, spec, t_len, batch, dtype) if use_cache else None
    if tuned is not None:
        options = fill_tuned(options, tuned, spec, t_len, batch, dtype)
    recurrence = kernels.resolve(options.recurrence, spec.hidden_sizes, dtype, cell=spec.cell)
    block_size = options.block_size
    if block_size is None and recurrence == "pallas":
        block_size = t_len  # the kernels run all T steps in one launch; blocks are for CPU caches
    store = resolve_gates(options.gates, spec, t_len, batch, options.checkpoint_every, dtype)
    if block_size is None and recurrence == "native" and native_whole(spec, t_len, batch, store):
        block_size = t_len  # (store: no checkpoint segments)
    if block_size is None:
        block_size = auto_block_size(t_len, batch, block_width(spec), half=precision.is_half(dtype))
        if recurrence == "native" and spec.cell == "elman":  # its sums in the kernel
            block_size = elman_kernel_block(spec, t_len, batch, block_size)
        if recurrence == "native" and options.checkpoint_every is not None:  # the kernel in segments
            block_size = segment_block(spec, options.checkpoint_every, batch, recurrence, block_size, dtype)
    return Plan(
        block=min(block_size, t_len),
        store=store,
        segment=options.checkpoint_every,
        unroll=forward.resolve_unroll(options.unroll),
        recurrence=recurrence,
        generic=options.generic,
        with_norms=options.diagnostics,
        with_dxs=options.with_dxs,
    )


def padded_length(plan: Plan, t_len: int) -> int:
    """T' >= T, the time axis padded to a multiple of the segment (or, without one, the block)."""
    unit = segment_levels(plan.segment)[0] if plan.segment else plan.block
    return math.ceil(t_len / unit) * unit
