"""Self-supervised model zoo: publish encoders under a name, load them back anywhere.

    import zoo
    encoder = zoo.load("moco_resnet18_fashion_mnist")    # trainable keras.Model, verified
    zoo.load("moco_resnet18_fashion_mnist:2")             # a version, or a label ("name:stable")
    zoo.publish("runs/moco", name="moco_resnet18_fashion_mnist")
    zoo.list_models(); zoo.info(name); zoo.embed(name, images)

The store is `store=` (a directory, any tf.io.gfile URI, or a read-only http(s) URL), else
$ZOO_HOME, else ~/.ssl_zoo. Every file is checked against the index's sha256 before it is
used; a mismatch raises `ChecksumError` and nothing is returned.
"""

from __future__ import annotations

import json
import os
import tempfile

from zoo import backbones  # registers the custom layers so `.keras` files load as-is  # noqa: F401
from zoo.errors import (  # noqa: F401  (re-exported API)
    ArtifactError,
    ChecksumError,
    IndexFormatError,
    InvalidNameError,
    LockTimeoutError,
    NotFoundError,
    ReadOnlyStoreError,
    StoreUnreachableError,
    ZooError,
)
from zoo.index import parse_ref, validate_label, validate_name
from zoo.store import check_files, open_store, read_verified, serving_base_path, verified_dir  # noqa: F401

__all__ = [
    "load", "load_classifier", "list_models", "info", "publish", "embed", "remove", "verify", "set_label",
    "serving_base_path",
    "backbones", "ZooError", "ArtifactError", "ChecksumError", "IndexFormatError", "InvalidNameError",
    "LockTimeoutError", "NotFoundError", "ReadOnlyStoreError", "StoreUnreachableError",
]

_loaded = {}  # (store root, name, version, sha256 of encoder.keras) -> model, for embed()


def _resolve(ref, version, store):
    st = open_store(store)
    name, version = parse_ref(ref, version)
    number, entry = st.read_index().resolve(name, version)
    return st, name, number, entry


def load(name: str, version: int | str | None = None, store=None, compile: bool = False):
    """Loads a published encoder as a trainable `keras.Model`.

    Args:
      name: "name", "name:3" or "name:label".
      version: version number or label (alternative to the ":" form); default latest.
      store: store location; default $ZOO_HOME or ~/.ssl_zoo.
      compile: passed to `keras.saving.load_model` (encoders are published uncompiled).

    Raises:
      NotFoundError (with close names), ChecksumError, StoreUnreachableError.
    """
    from zoo.export import KERAS_FILENAME

    return _load_keras_file(name, version, store, compile, KERAS_FILENAME)


def load_classifier(name: str, version: int | str | None = None, store=None, compile: bool = False):
    """Loads the classifier published with a label-trained encoder: a `keras.Model` from
    images to class probabilities; `info(name)["class_names"]` names its outputs."""
    from zoo.export import CLASSIFIER_FILENAME

    return _load_keras_file(name, version, store, compile, CLASSIFIER_FILENAME)


def _load_keras_file(name, version, store, compile, filename):
    import keras

    from zoo.export import KERAS_FILENAME

    st, name, number, entry = _resolve(name, version, store)
    if filename not in entry["files"]:
        hint = ("republish it" if filename == KERAS_FILENAME
                else "it was published without a classifier (only label-trained runs have one)")
        raise ArtifactError(f"{name}:{number} has no {filename} in the index; {hint}.")
    directory = verified_dir(st, name, number, entry, "nothing was loaded", skip=(filename,))
    # Load the very bytes that were hashed, so the file cannot change between check and use.
    data = read_verified(directory, filename, entry["files"][filename])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "wb") as f:
            f.write(data)
        model = keras.saving.load_model(path, compile=compile)
    model.trainable = True  # entries published frozen (FixMatch's EMA encoder, before session 33) too
    return model


def info(name: str, version: int | str | None = None, store=None) -> dict:
    """The model card of a published version (default latest), plus its version and labels."""
    from zoo.card import CARD_FILENAME

    st, name, number, entry = _resolve(name, version, store)
    directory = st.fetch(name, number, {**entry, "files": {CARD_FILENAME: entry["files"][CARD_FILENAME]}})
    model_card = json.loads(read_verified(directory, CARD_FILENAME, entry["files"][CARD_FILENAME]))
    labels = sorted(k for k, v in st.read_index().labels(name).items() if v == number)
    return {**model_card, "version": number, "labels": labels, "ref": f"{name}:{number}", "store": st.root}


def list_models(store=None) -> list[dict]:
    """One summary per published name (its latest version), sorted by name."""
    index = open_store(store).read_index()
    models = []
    for name in index.names():
        versions = index.versions(name)
        if not versions:
            continue
        _, entry = index.resolve(name)
        models.append({"name": name, "latest": versions[-1], "versions": versions, "labels": index.labels(name),
                       **entry.get("summary", {})})
    return models


EMBEDDINGS = ("encoder", "head")


def _read_run_dir(run_dir: str, embedding: str = "encoder"):
    """The model to publish with its run.json and metrics.json.

    embedding="head" publishes embedding.keras (encoder + the recipe's projection head):
    its card's `knn` is then the run's kNN on that embedding, and the encoder's own kNN and
    probe are kept as `knn_encoder` / `linear_probe_encoder`.
    """
    import keras
    import tensorflow as tf

    def read_json(filename, required):
        path = os.path.join(run_dir, filename)
        if not tf.io.gfile.exists(path):
            if required:
                raise ArtifactError(f"{path} is missing; is {run_dir} a finished `recipes.train --model_dir`?")
            return None
        with tf.io.gfile.GFile(path) as f:
            try:
                return json.loads(f.read())
            except ValueError as e:
                raise ArtifactError(f"{path} is not valid JSON: {e}") from e

    run = read_json("run.json", required=True)
    metrics = read_json("metrics.json", required=True)
    encoder_path = os.path.join(run_dir, "encoder.keras")
    if not tf.io.gfile.exists(encoder_path):
        raise ArtifactError(f"{encoder_path} is missing; the run has not finished (or failed) - rerun it to resume.")
    if embedding == "encoder":
        return keras.saving.load_model(encoder_path, compile=False), run, metrics
    model_path = os.path.join(run_dir, "embedding.keras")
    if not tf.io.gfile.exists(model_path) or "knn_embedding" not in metrics:
        raise ArtifactError(
            f"{run_dir} has no embedding.keras with a knn_embedding metric: its recipe "
            f"({run.get('recipe')}) has no projection head, or the run predates them (rerun its command "
            "to re-evaluate it). Publish its encoder instead (embedding='encoder').")
    renamed = {"knn": "knn_encoder", "linear_probe": "linear_probe_encoder", "knn_embedding": "knn"}
    metrics = {renamed.get(key, key): value for key, value in metrics.items()}
    return keras.saving.load_model(model_path, compile=False), {**run, "embedding": "head"}, metrics


def _read_classifier(run_dir: str, run: dict):
    """(classifier, class names) of a label-trained run directory, or (None, None)."""
    import keras
    import tensorflow as tf

    from zoo.export import CLASSIFIER_FILENAME

    path = os.path.join(run_dir, CLASSIFIER_FILENAME)
    if not tf.io.gfile.exists(path):
        return None, None
    if not run.get("class_names"):
        raise ArtifactError(f"{path} exists but run.json has no class_names; rerun the run's command to "
                            "re-evaluate it, which writes them.")
    return keras.saving.load_model(path, compile=False), run["class_names"]


def publish(
    run_dir: str | None = None,
    *,
    name: str,
    encoder=None,
    run: dict | None = None,
    metrics: dict | None = None,
    store=None,
    labels=(),
    description: str | None = None,
    embedding: str = "encoder",
    classifier=None,
    class_names=None,
) -> str:
    """Publishes an encoder as the next version of `name`; returns "name:version".

    Either `run_dir` (a `recipes.train --model_dir`: encoder.keras, run.json, metrics.json)
    or `encoder` with optional `run` (run.json-like metadata: recipe, recipe_config,
    backbone, dataset, ...) and `metrics` ({"knn": {"accuracy", "protocol"}, ...}).
    From a run directory, `embedding="head"` publishes the encoder with the recipe's
    projection head (embedding.keras), whose output was the better kNN space for
    low-temperature contrastive recipes; the default publishes the encoder alone.

    A classifier trained with labels is published beside the encoder, so the served
    model also answers TF Serving's Classify: from a run directory that holds
    classifier.keras (label recipes write it), or `classifier` (images -> [N, K]
    probabilities) with its K `class_names`.

    The artifact is written and verified in the store's staging area, then moved into
    place and added to the index under the store's lock; on any failure the store is left
    as it was.
    """
    validate_name(name)
    labels = [validate_label(label) for label in ([labels] if isinstance(labels, str) else labels)]
    if (run_dir is None) == (encoder is None):
        raise TypeError("publish() takes either a run directory or encoder=..., not both or neither.")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"Unknown embedding {embedding!r}. Valid: {', '.join(EMBEDDINGS)}.")
    if embedding != "encoder" and run_dir is None:
        raise TypeError("embedding='head' reads embedding.keras from a run directory; with encoder=..., "
                        "pass the model you want served.")
    st = open_store(store)
    st.require_writable()  # before any work
    if run_dir is not None:
        if run is not None or metrics is not None:
            raise TypeError("With a run directory, run and metrics come from its run.json and metrics.json.")
        if classifier is not None or class_names is not None:
            raise TypeError("With a run directory, the classifier comes from its classifier.keras.")
        encoder, run, metrics = _read_run_dir(os.fspath(run_dir), embedding)
        classifier, class_names = _read_classifier(os.fspath(run_dir), run)
    elif classifier is not None:
        from zoo.export import check_classifier

        check_classifier(classifier, encoder, class_names)  # before any work

    from zoo import card as cards
    from zoo import export

    # Published without mixed precision (float32); verified against that copy.
    encoder = export.without_mixed_precision(encoder)
    classifier = None if classifier is None else export.without_mixed_precision(classifier)
    shape = list(export.encoder_input_shape(encoder))
    if run and run.get("input_shape") is not None and list(run["input_shape"]) != shape:
        raise ArtifactError(f"run.json says input_shape {run['input_shape']}, but the encoder takes {shape}.")

    staged = st.new_staging_dir()
    import tensorflow as tf

    try:
        model_card = export.write_artifact(encoder, staged, name=name, run=run, metrics=metrics,
                                           description=description, classifier=classifier,
                                           class_names=class_names)
        export.verify_artifact(staged, encoder, classifier=classifier)
        from zoo.store import hash_tree

        files = hash_tree(staged)
        entry = {"files": files, "created_at": model_card["created_at"], "summary": cards.summary(model_card)}
        version = st.commit(staged, name, entry, labels)
    finally:
        if tf.io.gfile.exists(staged):
            tf.io.gfile.rmtree(staged)
    return f"{name}:{version}"


def set_label(name: str, label: str, version: int, store=None) -> None:
    """Points a version label (e.g. "stable") of `name` at `version`."""
    open_store(store).set_label(validate_name(name), label, version)


def remove(ref: str, store=None) -> list[int]:
    """Removes "name:version" (or every version of "name"); returns the removed version numbers."""
    name, version = parse_ref(ref)
    return open_store(store).remove(name, version)


def verify(store=None) -> dict:
    """Re-hashes every published file. Returns {"checked": [refs], "corrupt": {ref: [problems]},
    "leftovers": [unlisted directories from interrupted publishes]}."""
    st = open_store(store)
    index = st.read_index()
    report = {"store": st.root, "checked": [], "corrupt": {}, "leftovers": st.leftovers(index)}
    for name in index.names():
        for number in index.versions(name):
            ref = f"{name}:{number}"
            _, entry = index.resolve(name, number)
            try:
                problems = check_files(st.fetch(name, number, entry), entry["files"])
            except (ChecksumError, NotFoundError, IndexFormatError) as e:
                problems = [str(e)]
            report["checked"].append(ref)
            if problems:
                report["corrupt"][ref] = problems
    return report


def embed(name: str, images, store=None, batch_size: int = 256):
    """L2-normalized embeddings (N, D) of images (N, H, W, C) in [0, 255] - what serving returns."""
    import numpy as np

    from zoo.export import KERAS_FILENAME

    st, name, number, entry = _resolve(name, None, store)
    key = (st.root, name, number, entry["files"][KERAS_FILENAME]["sha256"])
    if key not in _loaded:
        _loaded[key] = load(name, number, store=st)
    features = np.asarray(_loaded[key].predict(np.asarray(images, "float32"), batch_size=batch_size, verbose=0))
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
