"""Encoder -> artifacts: a `.keras` file for Keras users, a SavedModel for serving.

The SavedModel is what TensorFlow Serving (or `serving.server`) loads, so it carries the
whole serving contract inside its graph:

* `serving_default`: `images` float32 [N, H, W, C] in [0, 255] -> `embedding` float32
  [N, D], L2-normalized (so a dot product is a cosine similarity);
* `embed_bytes`: `image_bytes` string [N] (JPEG/PNG/GIF/BMP) -> `embedding`; decoding to
  C channels, resizing to (H, W) and the cast happen in the graph, so clients can send
  encoded files (`{"b64": ...}` over REST) without any preprocessing code.

A classifier trained with labels (`recipes.train --recipe=finetune|fixmatch|...`) adds
* `classify`, method `tensorflow/serving/classify` (TF Serving's Classify API and REST
  `:classify`): `inputs` string [N] of serialized tf.Examples whose bytes feature
  `image/encoded` holds an encoded image -> `classes` string [N, K] (the class names)
  and `scores` float32 [N, K] (the classifier's probabilities).
Keras 3 writes every signature with the predict method, so the classify one is
re-marked in saved_model.pb before the version is renamed into place.

Both are written to a temporary sibling directory and renamed into place, so a server
polling the base directory never sees a half-written version.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import keras
import tensorflow as tf

from zoo.images import decode_image, fit_image

SERVING_DEFAULT = "serving_default"
EMBED_BYTES = "embed_bytes"
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
EMBEDDING_KEY = "embedding"
KERAS_FILENAME = "encoder.keras"
CLASSIFY = "classify"
CLASSIFY_METHOD = "tensorflow/serving/classify"
EXAMPLES_KEY = "inputs"
IMAGE_FEATURE = "image/encoded"
CLASSES_KEY = "classes"
SCORES_KEY = "scores"
CLASSIFIER_FILENAME = "classifier.keras"


def encoder_input_shape(encoder: keras.Model) -> tuple[int, int, int]:
    """(H, W, C) of the encoder's single image input; the serving graph needs all three."""
    shape = encoder.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ValueError(f"The encoder must take one image input, it takes {len(shape)} inputs.")
        shape = shape[0]
    dims = tuple(shape)[1:]
    if len(dims) != 3 or any(d is None for d in dims):
        raise ValueError(
            f"The encoder input shape must be (None, H, W, C) with known H, W, C, got {tuple(shape)}. "
            "Build the encoder with a fixed input_shape (see zoo.backbones.build)."
        )
    return tuple(int(d) for d in dims)


def embedding_dim(encoder: keras.Model) -> int:
    """D of the pooled (N, D) output; anything else is not an encoder the zoo can serve."""
    shape = encoder.output_shape
    if isinstance(shape, list) or len(shape) != 2 or shape[-1] is None:
        raise ValueError(
            f"The encoder must output pooled features of shape (None, D), got {shape}. "
            "Add a pooling layer (e.g. GlobalAveragePooling2D) before exporting."
        )
    return int(shape[-1])


def _decode_images(image_bytes, height, width, channels):
    """Encoded images [N] -> float32 [N, H, W, C] in [0, 255]: exactly the pixels when the size
    matches, else scaled to cover and centre-cropped (`zoo.images.fit_image`, as in training)."""

    def decode(data):
        image = decode_image(data, channels)
        image.set_shape([None, None, channels])
        return fit_image(image, height, width)

    return tf.map_fn(
        decode, image_bytes, fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32)
    )


def check_classifier(classifier: keras.Model, encoder: keras.Model, class_names) -> list[str]:
    """The class names as strings, once the classifier is known to take the encoder's images
    and return one probability per name."""
    if classifier.input_shape != encoder.input_shape:
        raise ValueError(f"The classifier takes {classifier.input_shape}, the encoder {encoder.input_shape}: "
                         "both must take the same images.")
    names = [str(name) for name in class_names or ()]
    if tuple(classifier.output_shape) != (None, len(names)):
        raise ValueError(f"The classifier outputs {classifier.output_shape}, but {len(names)} class names were "
                         "given: it must output one probability per class name.")
    return names


def _archive(encoder: keras.Model, classifier: keras.Model | None = None,
             class_names=None) -> keras.export.ExportArchive:
    height, width, channels = encoder_input_shape(encoder)
    embedding_dim(encoder)

    def embed(images):
        features = tf.cast(encoder(images, training=False), tf.float32)
        return {EMBEDDING_KEY: tf.math.l2_normalize(features, axis=-1)}

    def embed_bytes(image_bytes):
        return embed(_decode_images(image_bytes, height, width, channels))

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint(
        SERVING_DEFAULT,
        embed,
        input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32, name=IMAGES_KEY)],
    )
    archive.add_endpoint(
        EMBED_BYTES, embed_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)]
    )
    if classifier is not None:
        names = tf.constant(check_classifier(classifier, encoder, class_names))
        archive.track(classifier)

        def classify(serialized_examples):
            features = tf.io.parse_example(serialized_examples, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
            images = _decode_images(features[IMAGE_FEATURE], height, width, channels)
            scores = tf.cast(classifier(images, training=False), tf.float32)
            classes = tf.tile(names[None, :], [tf.shape(scores)[0], 1])
            return {CLASSES_KEY: classes, SCORES_KEY: scores}

        archive.add_endpoint(
            CLASSIFY, classify, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_KEY)]
        )
    return archive


def _mark_classify_signature(saved_model_dir: str) -> None:
    """Gives the `classify` signature TF Serving's classify method name (Keras writes predict)."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = f"{saved_model_dir}/saved_model.pb"
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        if CLASSIFY in meta_graph.signature_def:
            meta_graph.signature_def[CLASSIFY].method_name = CLASSIFY_METHOD
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(proto.SerializeToString())


def write_saved_model(encoder: keras.Model, path: str, classifier: keras.Model | None = None,
                      class_names=None) -> str:
    """Writes the serving SavedModel into `path` (which must not exist yet); returns `path`.

    With `classifier` (images -> [N, K] probabilities) and its K `class_names`, the
    SavedModel also answers Classify.

    `path` may be any `tf.io.gfile` URI. Written to a temporary sibling first and renamed,
    so `path` either holds a complete SavedModel or does not exist.
    """
    if tf.io.gfile.exists(path):
        raise FileExistsError(f"Refusing to overwrite existing export {path}; choose a new version or directory.")
    parent = os.path.dirname(path.rstrip("/")) or "."
    tf.io.gfile.makedirs(parent)
    tmp = f"{parent}/.tmp-{os.path.basename(path.rstrip('/'))}-{uuid.uuid4().hex[:12]}"
    try:
        _archive(encoder, classifier, class_names).write_out(tmp, verbose=False)
        if classifier is not None:
            _mark_classify_signature(tmp)
        tf.io.gfile.rename(tmp, path)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return path


def versions_in(base: str) -> list[int]:
    """Integer version subdirectories of a TF Serving model base path, ascending."""
    from zoo.store import version_dirs

    return version_dirs(base)


def export_saved_model(encoder: keras.Model, export_dir: str, version: int | None = None) -> str:
    """Writes `<export_dir>/<version>/` in TF Serving's layout and returns that path.

    Args:
      encoder: `keras.Model` from images (N, H, W, C) in [0, 255] to features (N, D).
      export_dir: the model's base path (`<base>/<model name>`); any `tf.io.gfile` URI.
      version: positive integer; defaults to one more than the highest existing version.
    """
    if version is None:
        version = (versions_in(export_dir) or [0])[-1] + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's layout), got {version!r}.")
    return write_saved_model(without_mixed_precision(encoder), f"{export_dir.rstrip('/')}/{version}")


def save_trainable(model: keras.Model, path: str) -> None:
    """`model.save(path)`, atomically, with every layer trainable, as the zoo promises its models
    (`zoo.load`), whatever a recipe froze for training (FixMatch's EMA encoder is updated
    by averaging, not by gradients). Keras records `trainable` in the file; the model's own
    flags are put back after saving."""
    frozen = [layer for layer in model._flatten_layers(include_self=True) if not layer.trainable]
    for layer in frozen:
        layer.trainable = True
    # Written beside, then renamed: a kill mid-save never leaves a truncated file at `path`.
    partial = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex}.keras")
    try:
        model.save(partial)
        os.replace(partial, path)
    finally:
        for layer in frozen:
            layer.trainable = False
        if os.path.exists(partial):
            os.remove(partial)


def write_keras(encoder: keras.Model, path: str) -> str:
    """Saves a model (the encoder, or the classifier) as a trainable `.keras` file (any gfile
    URI, via a local temp file)."""
    if not path.endswith(".keras"):
        raise ValueError(f"A Keras model file must end in .keras, got {path!r}.")
    if "://" not in path:
        save_trainable(encoder, path)
        return path
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, KERAS_FILENAME)
        save_trainable(encoder, local)
        tf.io.gfile.copy(local, path, overwrite=False)
    return path


REQUIRED_FILES = ("saved_model.pb", "variables/variables.index", KERAS_FILENAME)


def write_artifact(encoder: keras.Model, directory: str, *, name: str, run=None, metrics=None,
                   description=None, classifier: keras.Model | None = None, class_names=None) -> dict:
    """Writes a complete zoo artifact into the new directory `directory` and returns its card.

    One directory serves everyone: it is a TF Serving version directory (SavedModel at
    its root; servers ignore the other files), and it holds `encoder.keras` (trainable,
    fine-tunable) and `card.json` (whose "files" lists the sha256 of every other file).
    With a `classifier`, also `classifier.keras`, the `classify` signature, and the card's
    `class_names`.
    """
    from zoo import card as cards
    from zoo.store import hash_tree

    encoder = without_mixed_precision(encoder)
    classifier = None if classifier is None else without_mixed_precision(classifier)
    shape = encoder_input_shape(encoder)
    write_saved_model(encoder, directory, classifier, class_names)
    write_keras(encoder, f"{directory}/{KERAS_FILENAME}")
    if classifier is not None:
        write_keras(classifier, f"{directory}/{CLASSIFIER_FILENAME}")
    model_card = cards.make_card(
        name=name, input_shape=shape, embedding_dim=embedding_dim(encoder), run=run, metrics=metrics,
        files=hash_tree(directory), description=description,
        class_names=None if classifier is None else check_classifier(classifier, encoder, class_names),
    )
    with tf.io.gfile.GFile(f"{directory}/{cards.CARD_FILENAME}", "w") as f:
        f.write(cards.to_json(model_card))
    return model_card


def signatures_of(saved_model_pb: str) -> dict[str, tuple[list[str], list[str], str]]:
    """{signature key: (input keys, output keys, method name)} of a saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(saved_model_pb, "rb") as f:
        proto.ParseFromString(f.read())
    signatures = proto.meta_graphs[0].signature_def
    return {k: (sorted(s.inputs), sorted(s.outputs), s.method_name) for k, s in signatures.items()}


def _reloaded(directory: str, filename: str) -> keras.Model:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, filename)
        tf.io.gfile.copy(f"{directory}/{filename}", local)
        return keras.saving.load_model(local, compile=False)


def verify_artifact(directory: str, encoder: keras.Model, atol: float = 1e-5,
                    classifier: keras.Model | None = None) -> None:
    """Checks a written artifact before it is published; raises `ArtifactError` if anything is off.

    Files present, the serving signatures with the contract's keys (and method), and each
    `.keras` file reloads (in this process, without custom_objects) into a model that
    computes what `encoder` (and `classifier`) compute on a fixed random batch.
    """
    import numpy as np

    from zoo.errors import ArtifactError

    required = REQUIRED_FILES + ((CLASSIFIER_FILENAME,) if classifier is not None else ())
    missing = [f for f in required if not tf.io.gfile.exists(f"{directory}/{f}")]
    if missing:
        raise ArtifactError(f"The written artifact in {directory} lacks {missing}; nothing was published.")
    predict = "tensorflow/serving/predict"
    expected = {
        SERVING_DEFAULT: ([IMAGES_KEY], [EMBEDDING_KEY], predict),
        EMBED_BYTES: ([IMAGE_BYTES_KEY], [EMBEDDING_KEY], predict),
    }
    if classifier is not None:
        expected[CLASSIFY] = ([EXAMPLES_KEY], [CLASSES_KEY, SCORES_KEY], CLASSIFY_METHOD)
    found = signatures_of(f"{directory}/saved_model.pb")
    for signature, keys in expected.items():
        if found.get(signature) != keys:
            raise ArtifactError(f"SavedModel signature {signature} is {found.get(signature)}, expected {keys}.")

    height, width, channels = encoder_input_shape(encoder)
    images = np.random.default_rng(0).uniform(0, 255, (2, height, width, channels)).astype("float32")
    for filename, model in ((KERAS_FILENAME, encoder), (CLASSIFIER_FILENAME, classifier)):
        if model is None:
            continue
        before = np.asarray(model(images, training=False))
        after = np.asarray(_reloaded(directory, filename)(images, training=False))
        if before.shape != after.shape or not np.allclose(before, after, atol=atol, rtol=1e-5):
            raise ArtifactError(
                f"The saved {filename} does not reproduce the model's outputs; a custom layer probably lacks "
                "get_config or registration (keras.saving.register_keras_serializable). Nothing was published."
            )


@contextlib.contextmanager
def global_dtype_policy(policy: str):
    """Keras's global dtype policy is `policy` inside the block (layers built there compute in
    it) and what it was before after it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _with_policy_in_config(config, policy: str):
    """A serialized model's config with every layer's dtype policy replaced by `policy`."""
    if isinstance(config, list):
        return [_with_policy_in_config(item, policy) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(config.get("config"), dict):
        return {**config, "config": {**config["config"], "name": policy}}
    return {key: _with_policy_in_config(value, policy) for key, value in config.items()}


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """`model` rebuilt with every layer computing in `policy` (e.g. "float32", "mixed_bfloat16"),
    holding the same weights; `model` itself when every layer already does.

    Under a mixed policy the variables are float32 already, so a float32 copy loses nothing.
    """
    policies = {layer.dtype_policy.name for layer in model._flatten_layers(include_self=True)}
    if policies == {policy}:
        return model
    config = _with_policy_in_config(keras.saving.serialize_keras_object(model), policy)
    with global_dtype_policy(policy):  # for sublayers a custom layer builds in __init__
        copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def without_mixed_precision(model: keras.Model) -> keras.Model:
    """A float32 copy of a model with layers in a mixed policy (`mixed_bfloat16`, `mixed_float16`),
    else `model` itself. Mixed precision is a training device: the zoo publishes and verifies
    float32 models, so Keras users and servers get float32 features however an encoder trained."""
    if any(layer.dtype_policy.name.startswith("mixed_") for layer in model._flatten_layers(include_self=True)):
        return with_dtype_policy(model, "float32")
    return model
