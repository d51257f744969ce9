"""Orbax training checkpoints: exact round trip, keep-N, corruption fallback, another mesh."""

import os

import jax
import numpy as np
import pytest

from encdec_adapt.models import generative as models
from encdec_adapt.nn.config import load_preset
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, optim, trainer

CONFIG = load_preset("gemma_tiny").replace(
    vocab_size=64, num_layers=1, embed_dim=32, hidden_dim=64, num_heads=2, num_kv_heads=1
)


def _trainer(devices):
    rules = sharding.MeshRules(mesh_shape=(1, -1, 1))
    model = models.DecoderOnlyModel(config=CONFIG)
    return trainer.Trainer(model, optim.OptimizerConfig(), rules.make_mesh(devices), rules)


@pytest.fixture(scope="module")
def t8():
    return _trainer(jax.devices())


def _state(t, step):
    """A state whose every leaf depends on `step` (so restored steps are told apart)."""
    state = t.init_state()
    return jax.tree.map(lambda x: x + step if x.dtype != np.uint32 else x, state)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_n(tmp_path, t8):
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(2, keep=2))
    for step in (2, 4, 6):
        assert ckpt.save(step, _state(t8, step), {"index": step * 10})
    assert not ckpt.save(7, _state(t8, 7), {"index": 70})  # off the save interval
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]
    state, data = ckpt.restore_latest(t8.abstract_state())
    ckpt.close()
    assert data == {"index": 60}
    _assert_same(state, _state(t8, 6))
    q = state.params["stack"]["blocks"][0]["attn"]["q"]
    assert q.sharding == t8.state_shardings.params["stack"]["blocks"][0]["attn"]["q"]


def test_corrupt_latest_falls_back_to_previous(tmp_path, t8, capsys):
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1, keep=3))
    for step in (1, 2):
        ckpt.save(step, _state(t8, step), {"index": step})
    ckpt.wait()
    # damage step 2: remove the array data files of its state
    state_dir = os.path.join(ckpt.directory, "2", "state")
    removed = 0
    for root, _, files in os.walk(state_dir):
        for f in files:
            if not f.startswith("_"):
                os.remove(os.path.join(root, f))
                removed += 1
    assert removed
    state, data = ckpt.restore_latest(t8.abstract_state())
    assert data == {"index": 1}
    _assert_same(state, _state(t8, 1))
    out = capsys.readouterr().out
    assert "2 is unreadable" in out and "resuming from step 1" in out
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints_corrupt", "2"))
    assert ckpt.all_steps() == [1]
    # the step can be written again after the bad copy moved away
    assert ckpt.save(2, _state(t8, 2), {"index": 2})
    ckpt.close()


def test_no_checkpoint_gives_none(tmp_path, t8):
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig())
    assert ckpt.restore_latest(t8.abstract_state()) is None
    ckpt.close()


def test_restore_on_fewer_devices(tmp_path, t8):
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    ckpt.save(3, _state(t8, 3), {"index": 3})
    ckpt.close()
    t4 = _trainer(jax.devices()[:4])
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    state, _ = ckpt.restore_latest(t4.abstract_state())
    ckpt.close()
    _assert_same(state, _state(t8, 3))
    emb = state.params["embedder"]["embedding"]
    assert len(emb.sharding.device_set) == 4
    assert not emb.sharding.is_fully_replicated


def test_partially_written_step_is_ignored_and_cleaned(tmp_path, t8):
    """What a kill during an async save leaves: a step under Orbax's temporary name."""
    import shutil

    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    ckpt.save(1, _state(t8, 1), {"index": 1})
    ckpt.close()
    partial = os.path.join(ckpt.directory, "2.orbax-checkpoint-tmp-1795312461")
    shutil.copytree(os.path.join(ckpt.directory, "1"), partial)
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    assert ckpt.all_steps() == [1]
    state, data = ckpt.restore_latest(t8.abstract_state())
    ckpt.close()
    assert data == {"index": 1}
    _assert_same(state, _state(t8, 1))
    assert not os.path.exists(partial)
