"""params_io.check_writable (shared by adapt / export-params / save) and models.decoder_weights."""

import numpy as np
import pytest

from encdec_adapt.models import generative as models
from encdec_adapt.storage import params_io


def test_check_writable_refuses_an_existing_output_unless_overwrite(tmp_path):
    params_io.check_writable(str(tmp_path / "new"), overwrite=False)  # absent: fine
    params_io.check_writable(str(tmp_path), overwrite=False)  # an empty directory: fine
    ckpt = tmp_path / "ckpt"
    params_io.save(str(ckpt), {"w": np.zeros(2)}, "decoder_only", {})
    params_io.check_writable(str(ckpt), overwrite=True)
    with pytest.raises(params_io.CheckpointError, match=r"already exists \(pass --overwrite"):
        params_io.check_writable(str(ckpt), overwrite=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(params_io.CheckpointError, match="is not a params checkpoint"):
        params_io.check_writable(str(tmp_path / "mine"), overwrite=True)


def test_save_refuses_an_existing_output(tmp_path):
    params_io.save(str(tmp_path / "a"), {"w": np.zeros(2)}, "decoder_only", {})
    with pytest.raises(params_io.CheckpointError, match=str(tmp_path / "a")):
        params_io.save(str(tmp_path / "a"), {"w": np.ones(2)}, "decoder_only", {})


def test_decoder_weights_prefers_the_loss_weights_and_falls_back_to_nonpad_targets():
    targets = np.array([[5, 6, 0], [7, 0, 0]])
    np.testing.assert_array_equal(
        models.decoder_weights({"decoder_target_tokens": targets}), targets > 0
    )
    given = np.array([[1, 0, 0], [1, 1, 0]])
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": given}
    np.testing.assert_array_equal(models.decoder_weights(batch), given)
