"""Checkpoints that make every training run resumable: kill it, rerun it, lose nothing.

Two granularities, one per kind of run:
  * `EpochCheckpoint`: model + optimizer + a progress counter, saved at every epoch
    end (pretraining recipes, FixMatch) or every N steps (`SaveEverySteps`: the
    models of a self-training round). Restoring puts the optimizer's step counter
    back too, so learning-rate schedules and the stateless augmentation seeds
    (functions of the step) continue where they stopped.
  * `RoundCheckpoint`: the weights and metrics of each finished self-training round
    (Pseudo-Label, Noisy Student): a rerun rebuilds the last finished round's model
    as the teacher and continues with the next round; the round in progress resumes
    from its own `EpochCheckpoint` (`progress_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import keras
import tensorflow as tf


NOTES_FILE = "notes.json"  # beside the checkpoints: JSON notes of each kept checkpoint


class CheckpointError(ValueError):
    """A run's checkpoints exist but none can be restored."""


class EpochCheckpoint:
    """Saves model + optimizer + random-layer state + progress (finished epochs, or steps
    with unit="step"), and beside them JSON notes of the run so far (`notes.json`); restores
    the latest at start.

    The model's and optimizer's variables must exist before `restore` (build the
    optimizer first), so every value is restored at once rather than deferred.
    """

    def __init__(self, model, directory, max_to_keep=2, unit="epoch"):
        self.unit = unit
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        parts = {"model": model, "optimizer": model.optimizer, "epoch": self.epoch}
        # Keras keeps the state of seeded random layers (dropout, stochastic depth) in
        # variables the model's checkpoint does not hold; with them, a resumed run draws
        # the masks an uninterrupted one would. (Models without such layers save as before.)
        seed_states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
        if seed_states:
            parts["random_state"] = seed_states
        self.checkpoint = tf.train.Checkpoint(**parts)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep)
        self.notes = {}  # JSON-able facts of the run so far (wall time, logs), saved with each checkpoint

    def restore(self) -> int:
        """Loads the latest readable checkpoint, if any; returns the number of finished epochs.

        A damaged one (a truncated or missing file) is reported and the one before it is
        tried; when none can be read, CheckpointError says so rather than starting over."""
        damaged = []
        for path in reversed(self.manager.checkpoints):  # newest first
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as error:  # noqa: BLE001  (TF raises OpError, IndexError... on a damaged file)
                reason = str(getattr(error, "message", error)).strip().splitlines()[0]
                damaged.append(f"{path} ({reason})")
                print(f"Checkpoint {path} cannot be read ({reason}); trying the one before it.", flush=True)
                continue
            print(f"Resuming from {path} ({self.unit} {int(self.epoch.numpy())} done).", flush=True)
            self.notes = self._read_notes().get(str(int(self.epoch.numpy())), {})
            return int(self.epoch.numpy())
        if damaged:
            raise CheckpointError(
                f"No checkpoint in {self.manager.directory} can be read: {'; '.join(damaged)}. Move that folder "
                "away to train from the start, or put back a good copy.")
        return 0

    def save(self, epoch: int, notes: dict | None = None):
        """Saves the checkpoint `epoch`; `notes` go with it and come back as `.notes` on restore."""
        self.epoch.assign(epoch)
        self.notes = dict(notes or {})
        # Notes first: a crash in between leaves notes of a checkpoint that does not exist (never read).
        kept = self._read_notes()
        kept[str(epoch)] = self.notes
        os.makedirs(self.manager.directory, exist_ok=True)
        write_json(self._notes_path(), kept)
        self.manager.save(checkpoint_number=epoch)
        numbers = {path.rsplit("-", 1)[-1] for path in self.manager.checkpoints}
        write_json(self._notes_path(), {k: v for k, v in kept.items() if k in numbers})

    def _notes_path(self):
        return os.path.join(self.manager.directory, NOTES_FILE)

    def _read_notes(self) -> dict:
        return read_notes(self.manager.directory)


def read_notes(directory) -> dict:
    """The notes of each kept checkpoint in `directory`, by checkpoint number (a string)."""
    try:
        with open(os.path.join(directory, NOTES_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or checkpoints from before notes existed
        return {}


def build_optimizer(model):
    """Makes the compiled model's optimizer variables, under the model's strategy: built
    lazily inside a replicated train step they would not be mirrored like the weights,
    and a checkpoint could not restore them at once."""
    with model.distribute_strategy.scope():
        if not model.optimizer.built:  # building again would reset its momentum
            model.optimizer.build(model.optimized_variables)


def resume(model, directory, unit="epoch") -> tuple[EpochCheckpoint, int]:
    """Builds the optimizer, then restores the latest checkpoint in `directory`; returns the
    checkpoint and the epochs (or steps) it had finished."""
    build_optimizer(model)
    with model.distribute_strategy.scope():
        checkpoint = EpochCheckpoint(model, directory, unit=unit)
        return checkpoint, checkpoint.restore()


def noted_wall_time(directory) -> float | None:
    """The training time of all sessions that the newest checkpoint in `directory` noted
    (SaveEveryEpoch, SaveEverySteps), or None if there is none."""
    notes = read_notes(directory)
    newest = max(notes, key=int, default=None)
    return None if newest is None else notes[newest].get("wall_time_s")


class _TimedSaver(keras.callbacks.Callback):
    """A saving callback that keeps the wall time of all sessions: the restored checkpoint's
    note plus this session's."""

    def __init__(self, checkpoint: EpochCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.started = None

    def on_train_begin(self, logs=None):
        self.started = time.time() - self.checkpoint.notes.get("wall_time_s", 0.0)

    @property
    def wall_time_s(self) -> float:
        return round(time.time() - self.started, 2)


class SaveEveryEpoch(_TimedSaver):
    """Keras callback: `checkpoint.save(epoch)` after every finished epoch, noting the wall time
    of all sessions of the run so far and whatever `notes()` returns."""

    def __init__(self, checkpoint: EpochCheckpoint, notes=None):
        super().__init__(checkpoint)
        self.notes = notes

    def on_epoch_end(self, epoch, logs=None):
        self.checkpoint.save(epoch + 1, {"wall_time_s": self.wall_time_s, **(self.notes() if self.notes else {})})


class SaveEverySteps(_TimedSaver):
    """Keras callback: `checkpoint.save(steps)` every `every` optimizer steps and at the end
    of training, for runs too long to lose whole (one epoch of thousands of steps); each save
    notes the wall time of all sessions so far.

    Steps are the model's optimizer's, so the optimizer must be fresh when the run starts.
    """

    def __init__(self, checkpoint: EpochCheckpoint, every: int):
        super().__init__(checkpoint)
        if int(every) < 1:
            raise ValueError(f"every must be >= 1 step, got {every!r}.")
        self.every = int(every)

    def _steps(self):
        return int(self.model.optimizer.iterations.numpy())

    def _save(self):
        self.checkpoint.save(self._steps(), {"wall_time_s": self.wall_time_s})

    def on_train_batch_end(self, batch, logs=None):
        if self._steps() % self.every == 0:
            self._save()

    def on_train_end(self, logs=None):
        if self._steps() % self.every:
            self._save()


class RoundCheckpoint:
    """Per-round model weights (`round_<r>`; no optimizer state: each round starts a
    fresh one) and the metric rows of all finished rounds (`rounds.json`)."""

    def __init__(self, directory):
        self.directory = directory
        self.rows_path = os.path.join(directory, "rounds.json")

    def finished_rows(self) -> list:
        """Metric rows of the rounds already finished, in order (empty on a fresh run)."""
        if not os.path.exists(self.rows_path):
            return []
        with open(self.rows_path) as f:
            return json.load(f)

    def save(self, model, rows):
        """Writes round `len(rows) - 1`'s weights, then the rows (so rows never name missing weights)."""
        os.makedirs(self.directory, exist_ok=True)
        round_index = len(rows) - 1
        tf.train.Checkpoint(weights=list(model.weights)).write(self._weights_path(round_index))
        write_json(self.rows_path, rows)
        shutil.rmtree(self.progress_dir(round_index), ignore_errors=True)  # the round is kept whole now

    def restore(self, model, round_index):
        """Loads round `round_index`'s weights into `model` (built like that round's)."""
        path = self._weights_path(round_index)
        tf.train.Checkpoint(weights=list(model.weights)).read(path).assert_consumed()
        print(f"Resuming after self-training round {round_index} ({path}).", flush=True)

    def progress_dir(self, round_index):
        """Where the model of round `round_index` checkpoints while it trains."""
        return os.path.join(self.directory, f"round_{round_index}_progress")

    def _weights_path(self, round_index):
        return os.path.join(self.directory, f"round_{round_index}")


def write_json(path, content, indent=2):
    """Writes `content` to `path` via a temporary file and a rename: a run killed mid-write
    leaves the previous file (or none), never a truncated one. A run's metrics.json marks it
    finished for the benchmarks, so a half-written one would lie."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(content, f, indent=indent)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
