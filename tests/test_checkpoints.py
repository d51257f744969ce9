"""Orbax training checkpoints: exact round trip, keep-N, another mesh; restore tells corruption
(quarantined, previous step used) from mismatch (refused, nothing moved) and from transient
storage errors (retried)."""

import os
import shutil

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
    state, data, step = ckpt.restore_latest(t8.abstract_state())
    ckpt.close()
    assert (data, step) == ({"index": 60}, 6)
    _assert_same(state, _state(t8, 6))
    q = state.params["stack"]["blocks"][0]["attn"]["q"]
    assert q.sharding == t8.state_shardings.params["stack"]["blocks"][0]["attn"]["q"]


def _array_files(step_dir):
    """The data files of a step's state (OCDBT keeps array chunks under d/ folders; not every
    file there is read back, so damage is done to all of them)."""
    files = []
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            files += [os.path.join(root, n) for n in names]
    return files


def _two_steps(tmp_path, t8):
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1, keep=None))
    for step in (1, 2):
        ckpt.save(step, _state(t8, step), {"index": step})
    ckpt.wait()
    return ckpt


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
def test_damaged_newest_step_is_quarantined_and_previous_used(tmp_path, t8, capsys, damage):
    ckpt = _two_steps(tmp_path, t8)
    files = _array_files(os.path.join(ckpt.directory, "2"))
    assert files
    for f in files:
        damage(f)
    state, data, step = ckpt.restore_latest(t8.abstract_state())
    assert (step, data) == (1, {"index": 1})
    _assert_same(state, _state(t8, 1))
    out = capsys.readouterr().out
    assert "2 is damaged" in out and "resuming from step 1" in out
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints_corrupt", "2"))
    assert ckpt.all_steps() == [1]
    # The step is written again, damaged again: the earlier quarantined copy is kept.
    assert ckpt.save(2, _state(t8, 2), {"index": 2})
    ckpt.wait()
    for f in _array_files(os.path.join(ckpt.directory, "2")):
        _flip_byte(f)
    assert ckpt.restore_latest(t8.abstract_state())[2] == 1
    ckpt.close()
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints_corrupt"))) == ["2", "2.1"]


def test_digest_matches_an_independent_count_and_sees_one_bit():
    """The digest is sum(bits * odd weight) mod 2^32 per leaf; numpy recomputes it."""
    rng = np.random.default_rng(0)
    tree = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.integers(-9, 9, (7,)).astype(np.int32),
        "c": rng.standard_normal((4,)).astype(jax.numpy.bfloat16),
    }

    def reference(x):
        bits = x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize]).astype(np.uint64).ravel()
        w = (np.arange(bits.size, dtype=np.uint64) * 0x9E3779B1 | 1) % 2**32
        return int((np.sum(bits * w % 2**32) % 2**32) ^ bits.size)

    digest = checkpoints.state_digest(tree)
    assert digest == {k: reference(v) for k, v in tree.items()}
    for k in tree:
        flipped = dict(tree)
        raw = tree[k].copy().view(np.uint8)
        raw.reshape(-1)[raw.size // 2] ^= 1
        flipped[k] = raw.view(tree[k].dtype).reshape(tree[k].shape)
        assert checkpoints.state_digest(flipped)[k] != digest[k]


def test_another_model_is_refused_and_nothing_moves(tmp_path, t8):
    ckpt = _two_steps(tmp_path, t8)
    ckpt.close()
    rules = sharding.MeshRules(mesh_shape=(1, -1, 1))
    wider = models.DecoderOnlyModel(config=CONFIG.replace(embed_dim=48))
    t_wide = trainer.Trainer(wider, optim.OptimizerConfig(), rules.make_mesh(), rules)
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    with pytest.raises(checkpoints.CheckpointMismatch) as e:
        ckpt.restore_latest(t_wide.abstract_state())
    msg = str(e.value)
    assert "embedder/embedding is float32[64, 32] in the checkpoint, float32[64, 48]" in msg
    assert ckpt.all_steps() == [1, 2]
    # Another optimizer: its state tree differs.
    adafactor = trainer.Trainer(
        models.DecoderOnlyModel(config=CONFIG),
        optim.OptimizerConfig(name="adafactor"),
        rules.make_mesh(),
        rules,
    )
    with pytest.raises(checkpoints.CheckpointMismatch, match="opt_state"):
        ckpt.restore_latest(adafactor.abstract_state())
    ckpt.close()
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints_corrupt"))


def test_changed_setting_is_refused_unless_overridden(tmp_path, t8):
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    ckpt.save(1, _state(t8, 1), {"index": 1}, settings={"train_data/batch_size": 8})
    ckpt.wait()
    abstract = t8.abstract_state()
    with pytest.raises(checkpoints.CheckpointMismatch) as e:
        ckpt.restore_latest(abstract, {"train_data/batch_size": 16})
    assert "train_data/batch_size is 8 in the checkpoint and 16 in this run" in str(e.value)
    got = ckpt.restore_latest(abstract, {"train_data/batch_size": 16}, ["train_data/batch_size"])
    assert got[2] == 1
    ckpt.close()


def test_transient_errors_are_retried_never_quarantined(tmp_path, t8, monkeypatch):
    monkeypatch.setattr(checkpoints, "RETRY_SECONDS", 0.0)
    ckpt = _two_steps(tmp_path, t8)
    real = ckpt.manager.restore
    failures = {"left": 2}

    def flaky(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise TimeoutError("storage did not answer")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.manager, "restore", flaky)
    state, _, step = ckpt.restore_latest(t8.abstract_state())
    assert step == 2 and failures["left"] == 0
    _assert_same(state, _state(t8, 2))

    def down(*args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(ckpt.manager, "restore", down)
    with pytest.raises(checkpoints.CheckpointError, match="after 3 tries"):
        ckpt.restore_latest(t8.abstract_state())

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(ckpt.manager, "restore", oom)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        ckpt.restore_latest(t8.abstract_state())
    assert ckpt.all_steps() == [1, 2]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints_corrupt"))
    monkeypatch.undo()
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
    state, _, _ = ckpt.restore_latest(t4.abstract_state())
    ckpt.close()
    _assert_same(state, _state(t8, 3))
    emb = state.params["embedder"]["embedding"]
    assert len(emb.sharding.device_set) == 4
    assert not emb.sharding.is_fully_replicated


def test_partially_written_step_is_ignored_and_cleaned(tmp_path, t8):
    """What a kill during an async save leaves: a step under Orbax's temporary name. A reader
    (read-only) leaves it alone; the trainer's manager removes it."""
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    ckpt.save(1, _state(t8, 1), {"index": 1})
    ckpt.close()
    partial = os.path.join(ckpt.directory, "2.orbax-checkpoint-tmp-1795312461")
    shutil.copytree(os.path.join(ckpt.directory, "1"), partial)
    _, step = checkpoints.restore_run_params(str(tmp_path), t8.abstract_state().params)
    assert step == 1 and os.path.exists(partial)
    ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(1))
    assert ckpt.all_steps() == [1]
    state, data, _ = ckpt.restore_latest(t8.abstract_state())
    ckpt.close()
    assert data == {"index": 1}
    _assert_same(state, _state(t8, 1))
    assert not os.path.exists(partial)
