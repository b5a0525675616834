"""EpochCheckpoint: a damaged latest checkpoint falls back to the one before it; notes go with
their checkpoint."""

import glob

import keras
import numpy as np
import pytest

from recipes.checkpointing import CheckpointError, EpochCheckpoint


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _damage(directory, epoch):
    for path in glob.glob(f"{directory}/ckpt-{epoch}.data-*"):
        with open(path, "r+b") as f:
            f.truncate(8)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    model = _model()
    saver = EpochCheckpoint(model, str(tmp_path))
    weights = {}
    for epoch in (1, 2):
        model.layers[0].kernel.assign(np.full((3, 2), float(epoch), "float32"))
        saver.save(epoch, {"epoch_noted": epoch})
        weights[epoch] = model.get_weights()
    _damage(tmp_path, 2)

    restored = _model()
    checkpoint = EpochCheckpoint(restored, str(tmp_path))
    assert checkpoint.restore() == 1
    assert checkpoint.notes == {"epoch_noted": 1}  # the restored checkpoint's notes, not the newest
    for a, b in zip(restored.get_weights(), weights[1]):
        np.testing.assert_array_equal(a, b)
    assert "ckpt-2 cannot be read" in capsys.readouterr().out

    _damage(tmp_path, 1)  # nothing readable left: a clear error, not a silent restart from epoch 0
    with pytest.raises(CheckpointError, match="No checkpoint in .* can be read"):
        EpochCheckpoint(_model(), str(tmp_path)).restore()


def test_notes_are_kept_only_for_the_kept_checkpoints(tmp_path):
    saver = EpochCheckpoint(_model(), str(tmp_path), max_to_keep=2)
    for epoch in (1, 2, 3):
        saver.save(epoch, {"rows": list(range(epoch))})
    fresh = EpochCheckpoint(_model(), str(tmp_path))
    assert fresh.restore() == 3 and fresh.notes == {"rows": [0, 1, 2]}
    assert sorted(fresh._read_notes()) == ["2", "3"]
