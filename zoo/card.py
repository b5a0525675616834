"""Model cards: what an encoder is, how it was made, how good it is, and its exact bytes.

A card (`card.json`, beside the artifact files) is what `zoo info` shows and what
`recipes.train --zoo_entry=NAME` reads to retrain: it keeps the recipe name and its full
config, the backbone, data and schedule, the metrics each with its protocol, the machine
and code version that produced it, and the sha256 of every other artifact file (the card
cannot hash itself; the index records the card's own hash).

The version number is deliberately not in the card: the store assigns it under its lock
when the artifact is committed, after the card is written.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

from zoo.errors import ArtifactError

CARD_FILENAME = "card.json"
CARD_SCHEMA_VERSION = 1

# run.json keys the card lifts to its top level (the whole run.json is kept under "run").
RUN_FIELDS = (
    "recipe", "recipe_config", "backbone", "backbone_width", "backbone_norm", "dataset", "train_split", "epochs", "seed",
    "strategy", "num_replicas", "wall_time_s", "images_per_sec", "git_commit",
)
# What a card must carry to rerun its recipe (`--zoo_entry`).
REQUIRED_FOR_RETRAINING = ("recipe", "recipe_config", "backbone", "dataset")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def hardware() -> dict:
    """The machine a card was written on: enough to make sense of wall time and images/s."""
    import tensorflow as tf

    devices = {}
    for device in tf.config.list_physical_devices():
        devices[device.device_type] = devices.get(device.device_type, 0) + 1
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "devices": devices,
    }


def software() -> dict:
    import keras
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}


def git_commit(path: str | None = None) -> str | None:
    """Commit of the code checkout this library runs from, '+dirty' if it has local edits."""
    here = path or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def make_card(
    *,
    name: str,
    input_shape,
    embedding_dim: int,
    run: dict | None = None,
    metrics: dict | None = None,
    files: dict | None = None,
    description: str | None = None,
    class_names=None,
) -> dict:
    """Assembles a card from a training run's run.json / metrics.json (or partial metadata).

    Args:
      name: the zoo name the artifact is published under.
      input_shape: (H, W, C) the encoder takes; embedding_dim: D it returns.
      run: run.json contents (recipe, recipe_config, backbone, ...); missing keys become None.
      metrics: metrics.json contents, e.g. {"knn": {"accuracy": .., "protocol": {..}}, ...}.
      files: {relative path: {"sha256": .., "size": ..}} of the artifact files except the card.
      class_names: what the artifact's classifier (if it has one) answers Classify with.
    """
    run = dict(run or {})
    metrics = dict(metrics or {})
    for key, value in metrics.items():
        if isinstance(value, dict) and "accuracy" in value and "protocol" not in value:
            raise ArtifactError(
                f"Metric {key!r} has no 'protocol'; every metric must say how it was measured "
                "(dataset/split, epochs, k/T or probe type, seed)."
            )
    card = {
        "card_schema_version": CARD_SCHEMA_VERSION,
        "name": name,
        "description": description,
        **{key: run.get(key) for key in RUN_FIELDS},
        "input_shape": [int(d) for d in input_shape],
        "embedding_dim": int(embedding_dim),
        # What the artifact returns: the encoder's pooled features, or the recipe's projection head on top.
        "embedding": run.get("embedding") or "encoder",
        # A label-trained run's classifier (classifier.keras, the `classify` signature); None: encoder only.
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "metrics": metrics,
        "hardware": hardware(),
        "software": software(),
        "code_version": {"git_commit": run.get("git_commit") or git_commit()},
        "created_at": utc_now(),
        "run": run,
        "files": dict(sorted((files or {}).items())),
    }
    if card["git_commit"] is None:
        card["git_commit"] = card["code_version"]["git_commit"]
    return json.loads(json.dumps(card))  # proves it is plain JSON, and detaches it from the inputs


def summary(card: dict) -> dict:
    """The few card fields the index keeps, so `zoo list` needs no per-model reads."""
    metrics = card.get("metrics") or {}
    return {
        "recipe": card.get("recipe"),
        "backbone": card.get("backbone"),
        "dataset": card.get("dataset"),
        "input_shape": card.get("input_shape"),
        "embedding_dim": card.get("embedding_dim"),
        "embedding": card.get("embedding", "encoder"),
        "epochs": card.get("epochs"),
        "metrics": {
            key: value["accuracy"]
            for key, value in sorted(metrics.items())
            if isinstance(value, dict) and isinstance(value.get("accuracy"), (int, float))
        },
        "created_at": card.get("created_at"),
    }


def to_json(card: dict) -> str:
    return json.dumps(card, indent=2, sort_keys=True) + "\n"


def retraining_spec(card: dict) -> dict:
    """The run.json a card was made from, for `recipes.train --zoo_entry=NAME` to rerun its recipe.

    Raises `ArtifactError` for entries published without training metadata (e.g. from a
    bare encoder), which cannot be retrained from their card.
    """
    missing = [key for key in REQUIRED_FOR_RETRAINING if card.get(key) is None]
    if missing:
        raise ArtifactError(
            f"{card.get('name')!r} cannot be retrained from its card: it lacks {missing} (it was published "
            "without a training run). Retrain with explicit --recipe/--backbone/--dataset flags instead."
        )
    return {**(card.get("run") or {}), **{key: card[key] for key in RUN_FIELDS if card.get(key) is not None},
            "input_shape": card["input_shape"]}
