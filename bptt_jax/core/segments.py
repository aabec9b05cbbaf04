"""``checkpoint_every=k``: the states are stored every k steps and each k-step segment is recomputed
in the backward pass (unidirectional stacks).

The forward pass keeps only the state entering each segment of k steps (T/k boundary states per
layer); the backward pass walks the segments from the last to the first, re-runs the forward scans
inside the segment from its boundary state and runs the blocked BPTT over those k steps
(``backward.stack_backward_blocked``), carrying dh and the weight-gradient sums from segment to
segment. Stored activations grow like T/k + k instead of T, for about one extra forward pass of
compute. Inside a segment the block size is the largest divisor of k not above the plan's block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import backward
from bptt_jax.core.params import RNNParams, RNNSpec
from bptt_jax.core.plan import Plan

Array = jax.Array


def _largest_divisor_at_most(n: int, c: int) -> int:
    return max(d for d in range(1, min(n, c) + 1) if n % d == 0)


def stack_backward_segments(
    params: RNNParams, spec: RNNSpec, run: backward.Run, lengths: Array | None, plan: Plan
) -> tuple[backward.Carry, tuple[Array, ...], Array | None, Array | None]:
    """The explicit BPTT with segments of k = ``plan.segment`` steps.

    Args:
      run: the padded inputs, targets and weights (``run.hs`` is not read: the states are
        recomputed; ``run.h0`` holds the states before step 0); T' a multiple of k; no output mask.
      lengths: [B] valid steps (the padded steps are not valid), or None.

    Returns:
      (carry at step 0, the final states (L entries [B, W]), dxs [T', B, N] or None, norms [T', L] or None).
    """
    k = plan.segment
    assert k is not None
    n_seg = run.xs.shape[0] // k
    seg_plan = plan._replace(block=_largest_divisor_at_most(k, plan.block))
    seg = lambda a: None if a is None else a.reshape((n_seg, k) + a.shape[1:])
    if lengths is None:
        lens_s = None
    else:
        starts = jnp.arange(n_seg) * k
        lens_s = jnp.clip(lengths[None, :] - starts[:, None], 0, k).astype(jnp.int32)  # [S, B]

    def states(x_seg, h_start, lens):  # the forward scans over one segment, from its boundary states
        traces = backward.run_forward(params, spec, x_seg, h_start, lens, seg_plan)  # no gates kept: k steps
        return tuple(tr.states[0] for tr in traces)

    def seg_forward(h, inp):  # h: L entries [B, W], the state entering the segment
        x_seg, lens = inp
        return tuple(hs[-1] for hs in states(x_seg, h, lens)), h

    h_last, boundaries = lax.scan(seg_forward, run.h0, (seg(run.xs), lens_s))  # boundaries: L entries [S, B, W]

    def seg_backward(carry, inp):
        x_seg, tg_seg, w_seg, valid_seg, lens, h_start = inp
        seg_run = backward.Run(x_seg, states(x_seg, h_start, lens), h_start, valid_seg, tg_seg, w_seg)
        carry, dxs, norms = backward.stack_backward_blocked(params, spec, seg_run, carry, seg_plan)
        return carry, (dxs, norms)

    init = backward.zero_carry(params, run.h0)
    inputs = (seg(run.xs), seg(run.targets), seg(run.w), seg(run.valid), lens_s, boundaries)
    carry, (dxs, norms) = lax.scan(seg_backward, init, inputs, reverse=True)
    unseg = lambda a: None if a is None else a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
    return carry, h_last, unseg(dxs), unseg(norms)
