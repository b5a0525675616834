"""What a run directory trains, written when it starts, so a rerun resumes only that run.

A rerun of `recipes.train` with the same --model_dir resumes from its checkpoints. If the
rerun's flags define another run (another learning rate, recipe hyperparameters, labelled
split, number of epochs and hence learning-rate schedule...), resuming would silently
splice two runs into one encoder whose numbers no command reproduces. So the first start
records the run's definition in `<model_dir>/launch.json`, and every later start compares:
a difference stops the run with the flags that differ, before anything is trained. A
directory with nothing trained yet (no checkpoint, no encoder) takes the new definition,
so fixing a mistake that stopped the first start (a misspelt dataset) is not refused. Flags
that change only what is reported or where things are read from (evaluation, logging,
data and zoo paths, the distribution strategy) are not part of the definition: a run may
resume on another machine and report differently.

`allow_changes=True` (`--allow_changed_flags`) resumes anyway, for the deliberate case
(e.g. more self-training rounds on a finished run); the change is appended to the file's
`changes`, so the record says the run was spliced, and where.

The file also lets tools rebuild a run's model mid-training, before run.json exists
(`benchmarks/fixmatch_snapshot.py`).
"""

from __future__ import annotations

import json
import os
import time

FILENAME = "launch.json"


def _normalized(definition: dict) -> dict:
    """As it reads back from JSON (tuples become lists), so a fresh definition compares equal."""
    return json.loads(json.dumps(definition, sort_keys=True))


def read(model_dir: str) -> dict | None:
    """The recorded definition of the run in `model_dir`, or None (a new directory, or a run
    started before launch.json existed)."""
    path = os.path.join(model_dir, FILENAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["definition"]


def differences(recorded: dict, current: dict) -> dict:
    """{key: (recorded value, current value)} for every key whose values differ."""
    return {key: (recorded.get(key), current.get(key)) for key in sorted(set(recorded) | set(current))
            if recorded.get(key) != current.get(key)}


def has_progress(model_dir: str) -> bool:
    """Whether a rerun would resume something: a checkpoint or a finished encoder."""
    checkpoints = os.path.join(model_dir, "checkpoints")
    return (os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))) or \
        os.path.exists(os.path.join(model_dir, "encoder.keras"))


def check_or_record(model_dir: str, definition: dict, allow_changes: bool = False) -> None:
    """Records `definition` for a run directory with nothing trained yet; for one with progress,
    raises ValueError if it defines another run (unless `allow_changes`, which records the change)."""
    from recipes.checkpointing import write_json

    definition = _normalized(definition)
    path = os.path.join(model_dir, FILENAME)
    if not os.path.exists(path) or not has_progress(model_dir):
        write_json(path, {"definition": definition, "changes": []})
        return
    with open(path) as f:
        record = json.load(f)
    changed = differences(record["definition"], definition)
    if not changed:
        return
    if not allow_changes:
        listed = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changed.items())
        raise ValueError(
            f"{model_dir} holds a run started with other settings ({listed}). Resuming it would mix two "
            f"runs. Rerun with the original flags to resume it, use another --model_dir for a new run, "
            f"or pass --allow_changed_flags to continue this one with the new settings (recorded in "
            f"{FILENAME}).")
    record["changes"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "changed": {key: {"from": old, "to": new} for key, (old, new) in changed.items()}})
    record["definition"] = definition
    write_json(path, record)
