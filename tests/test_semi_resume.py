"""Label recipes survive interruption: FixMatch per epoch, Pseudo-Label / Noisy Student per round.

A crash is simulated in-process: the checkpoint is written, then the run raises.
The rerun with the same arguments must continue, not start over, and end as an
uninterrupted run does.
"""

import keras
import numpy as np
import pytest

from recipes import checkpointing
from recipes.semi.fixmatch import run_fixmatch
from recipes.semi.pseudo_label import run_pseudo_label
from tests.test_semi_self_training import _adam, _shapes, _tiny_encoder
from zoo import backbones


class Crash(Exception):
    pass


def _run_until_crash(monkeypatch, run, cls, calls):
    """Runs `run()`, crashing it right after its `calls`-th `cls.save`; then restores `save`."""
    original = cls.save
    count = {"n": 0}

    def save_then_maybe_crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            raise Crash()

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(cls, "save", save_then_maybe_crash)
        run()


def _fixmatch(checkpoint_dir):
    keras.utils.set_random_seed(0)  # the same initial weights for every run
    labelled = _shapes(12, seed=1)
    unlabelled, truth = _shapes(24, seed=2)
    encoder = backbones.build("resnet18_small", (16, 16, 1), width=0.125)
    return run_fixmatch(encoder, 3, labelled, unlabelled, steps=6, log_every=2, batch_size=4, mu=2,
                        threshold=0.3, heldout_unlabelled_labels=truth, checkpoint_dir=checkpoint_dir)


def test_fixmatch_resumes_after_the_last_epoch_and_ends_like_an_uninterrupted_run(monkeypatch, tmp_path, capsys):
    reference, _ = _fixmatch(str(tmp_path / "reference"))

    _run_until_crash(monkeypatch, lambda: _fixmatch(str(tmp_path / "interrupted")), checkpointing.EpochCheckpoint,
                     calls=2)
    capsys.readouterr()
    resumed, metrics = _fixmatch(str(tmp_path / "interrupted"))
    assert "epoch 2 done" in capsys.readouterr().out
    assert int(resumed.optimizer.iterations.numpy()) == 6  # 4 restored + 2 trained, not 6 more
    # Same weights (online and EMA): the resumed run skipped the batches it had already seen.
    for got, expected in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert "mask_rate" in metrics


def _pseudo_label(checkpoint_dir):
    keras.utils.set_random_seed(0)
    labelled = _shapes(12, seed=1, noise=30.0)
    unlabelled, truth = _shapes(60, seed=2, noise=30.0)
    return run_pseudo_label(_tiny_encoder, 3, labelled, unlabelled, _shapes(60, seed=3, noise=30.0), steps=20,
                            batch_size=12, heldout_unlabelled_labels=truth, optimizer_fn=_adam, rounds=2,
                            threshold=0.5, augment="none", checkpoint_dir=checkpoint_dir)


def test_self_training_resumes_after_the_last_finished_round(monkeypatch, tmp_path, capsys):
    _, reference = _pseudo_label(str(tmp_path / "reference"))

    # Crash after round 1 is saved (saves: round 0, round 1).
    _run_until_crash(monkeypatch, lambda: _pseudo_label(str(tmp_path / "interrupted")),
                     checkpointing.RoundCheckpoint, calls=2)
    saved = checkpointing.RoundCheckpoint(str(tmp_path / "interrupted")).finished_rows()
    assert [row["round"] for row in saved] == [0, 1]
    capsys.readouterr()
    _, resumed = _pseudo_label(str(tmp_path / "interrupted"))
    assert "Resuming after self-training round 1" in capsys.readouterr().out
    assert [row["round"] for row in resumed] == [0, 1, 2]
    assert resumed[:2] == saved  # finished rounds are not trained again
    # Round 2's teacher is the restored round-1 student: it labels the pool as in the
    # uninterrupted run.
    for key in ("num_pseudo_labelled", "teacher_unlabelled_accuracy", "pseudo_label_accuracy"):
        assert resumed[2][key] == pytest.approx(reference[2][key])
