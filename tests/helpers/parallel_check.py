"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/test_parallel.py).

Prints one JSON line: the largest difference between 1-device and 4-device parameters after three
steps, the batch's and carry's shardings, and the error for an indivisible batch size.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax as bj
from bptt_jax.command import data
from bptt_jax.command.config import OptimConfig
from bptt_jax.training import parallel, train

assert len(jax.devices()) == 4, jax.devices()
out = {}
# "bi_lengths": a bidirectional GRU on batches with lengths (the arrays task's), sharded with the rest
for key, bidirectional, cell in (("uni", False, "elman"), ("bi", True, "elman"), ("bi_lengths", True, "gru")):
    spec = bj.RNNSpec(3, (6, 4), 5, bidirectional=bidirectional, cell=cell)
    opt = train.make_optimizer(OptimConfig(name="adam", learning_rate=0.01), 10)
    s1 = s4 = train.init_state(jax.random.key(0), spec, opt, 8)
    f1 = train.make_train_step(spec, opt, stateful=not bidirectional)
    f4 = parallel.make_sharded_train_step(spec, opt, "4", 8, stateful=not bidirectional)
    rng = np.random.RandomState(0)
    for i in range(3):
        b = data.Batch(
            rng.randn(5, 8, 3).astype(np.float32),
            rng.randint(0, 5, (5, 8)).astype(np.int32),
            np.ones((5, 8), np.float32),
            np.full((8,), i == 0),
            rng.randint(1, 6, (8,)).astype(np.int32) if key == "bi_lengths" else None,
        )
        s1, m1 = f1(s1, b)
        s4, m4 = f4(s4, b)
    out[f"max_param_diff_{key}"] = max(
        float(jnp.max(jnp.abs(a - c)))
        for a, c in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params))
    )
    out[f"max_abs_param_{key}"] = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(s1.params))
    out[f"loss_diff_{key}"] = abs(float(m1.loss) - float(m4.loss))
mesh = f4.mesh
sb = parallel.shard_batch(mesh, b)
out["xs_spec"] = str(sb.xs.sharding.spec)
out["xs_shard_shapes"] = sorted({tuple(s.data.shape) for s in sb.xs.addressable_shards})
out["xs_num_devices"] = len(sb.xs.sharding.device_set)
out["carry_shard_shapes"] = sorted({tuple(s.data.shape) for s in s4.carry[0].addressable_shards})
try:
    parallel.make_sharded_train_step(spec, opt, "4", 6)
except ValueError as e:
    out["indivisible_error"] = str(e)
try:
    parallel.make_sharded_train_step(spec, opt, "8", 8)
except ValueError as e:
    out["too_many_error"] = str(e)
print(json.dumps(out))
