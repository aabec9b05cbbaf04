import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.training import checkpoint


def _tree():
    return {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.ones(4, jnp.int32), jnp.zeros(()))}


def test_round_trip(tmp_path):
    checkpoint.save(tmp_path / "x.ckpt", _tree(), metadata={"step": 3})
    tree, meta = checkpoint.load(tmp_path / "x.ckpt", _tree())
    np.testing.assert_array_equal(tree["a"], _tree()["a"])
    assert meta == {"step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary file left behind


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "x.ckpt"
    checkpoint.save(path, _tree())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"x.ckpt: corrupt or truncated"):
        checkpoint.load(path, _tree())


def test_flipped_bytes_are_reported(tmp_path):
    path = tmp_path / "x.ckpt"
    checkpoint.save(path, {"a": jnp.zeros(1000)})
    data = bytearray(path.read_bytes())
    i = data.find(b"\x00" * 64) + 8  # inside the array payload
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"x.ckpt: corrupt"):
        checkpoint.load(path, {"a": jnp.zeros(1000)})


def test_wrong_structure_is_reported(tmp_path):
    checkpoint.save(tmp_path / "x.ckpt", _tree())
    with pytest.raises(checkpoint.CheckpointError, match=r"holds 3 arrays, the model expects 1"):
        checkpoint.load(tmp_path / "x.ckpt", {"a": jnp.zeros(2)})
    with pytest.raises(checkpoint.CheckpointError, match=r"array 0 has shape \(2, 3\), the model expects \(3, 2\)"):
        checkpoint.load(tmp_path / "x.ckpt", {"a": jnp.zeros((3, 2)), "b": (jnp.ones(4, jnp.int32), jnp.zeros(()))})


def test_missing_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"no such file"):
        checkpoint.load(tmp_path / "nope.ckpt", _tree())
