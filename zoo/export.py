"""Encoder -> artifacts: a `.keras` file for Keras users, a SavedModel for serving.

The SavedModel is what TensorFlow Serving (or `serving.server`) loads, so it carries the
whole serving contract inside its graph:

* `serving_default`: `images` float32 [N, H, W, C] in [0, 255] -> `embedding` float32
  [N, D], L2-normalized (so a dot product is a cosine similarity);
* `embed_bytes`: `image_bytes` string [N] (JPEG/PNG/GIF/BMP) -> `embedding`; decoding to
  C channels, resizing to (H, W) and the cast happen in the graph, so clients can send
  encoded files (`{"b64": ...}` over REST) without any preprocessing code.

Both are written to a temporary sibling directory and renamed into place, so a server
polling the base directory never sees a half-written version.
"""

from __future__ import annotations

import os
import uuid

import keras
import tensorflow as tf

SERVING_DEFAULT = "serving_default"
EMBED_BYTES = "embed_bytes"
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
EMBEDDING_KEY = "embedding"
KERAS_FILENAME = "encoder.keras"


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
    """Encoded images [N] -> float32 [N, H, W, C] in [0, 255], exactly the pixels when no resize is needed."""

    def decode(data):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = tf.cast(image, tf.float32)
        same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
        image = tf.cond(same_size, lambda: image, lambda: tf.image.resize(image, (height, width)))
        return tf.ensure_shape(image, [height, width, channels])

    return tf.map_fn(
        decode, image_bytes, fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32)
    )


def _archive(encoder: keras.Model) -> keras.export.ExportArchive:
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
    return archive


def write_saved_model(encoder: keras.Model, path: str) -> str:
    """Writes the serving SavedModel into `path` (which must not exist yet); returns `path`.

    `path` may be any `tf.io.gfile` URI. Written to a temporary sibling first and renamed,
    so `path` either holds a complete SavedModel or does not exist.
    """
    if tf.io.gfile.exists(path):
        raise FileExistsError(f"Refusing to overwrite existing export {path}; choose a new version or directory.")
    parent = os.path.dirname(path.rstrip("/")) or "."
    tf.io.gfile.makedirs(parent)
    tmp = f"{parent}/.tmp-{os.path.basename(path.rstrip('/'))}-{uuid.uuid4().hex[:12]}"
    try:
        _archive(encoder).write_out(tmp, verbose=False)
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
    return write_saved_model(encoder, f"{export_dir.rstrip('/')}/{version}")


def write_keras(encoder: keras.Model, path: str) -> str:
    """Saves the trainable encoder as a `.keras` file (any gfile URI, via a local temp file)."""
    if not path.endswith(".keras"):
        raise ValueError(f"A Keras model file must end in .keras, got {path!r}.")
    if "://" not in path:
        encoder.save(path)
        return path
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, KERAS_FILENAME)
        encoder.save(local)
        tf.io.gfile.copy(local, path, overwrite=False)
    return path


REQUIRED_FILES = ("saved_model.pb", "variables/variables.index", KERAS_FILENAME)


def write_artifact(encoder: keras.Model, directory: str, *, name: str, run=None, metrics=None,
                   description=None) -> dict:
    """Writes a complete zoo artifact into the new directory `directory` and returns its card.

    One directory serves everyone: it is a TF Serving version directory (SavedModel at
    its root; servers ignore the other files), and it holds `encoder.keras` (trainable,
    fine-tunable) and `card.json` (whose "files" lists the sha256 of every other file).
    """
    from zoo import card as cards
    from zoo.store import hash_tree

    shape = encoder_input_shape(encoder)
    write_saved_model(encoder, directory)
    write_keras(encoder, f"{directory}/{KERAS_FILENAME}")
    model_card = cards.make_card(
        name=name, input_shape=shape, embedding_dim=embedding_dim(encoder), run=run, metrics=metrics,
        files=hash_tree(directory), description=description,
    )
    with tf.io.gfile.GFile(f"{directory}/{cards.CARD_FILENAME}", "w") as f:
        f.write(cards.to_json(model_card))
    return model_card


def _signature_keys(saved_model_pb: str) -> dict[str, tuple[list[str], list[str]]]:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(saved_model_pb, "rb") as f:
        proto.ParseFromString(f.read())
    signatures = proto.meta_graphs[0].signature_def
    return {k: (sorted(s.inputs), sorted(s.outputs)) for k, s in signatures.items()}


def verify_artifact(directory: str, encoder: keras.Model, atol: float = 1e-5) -> None:
    """Checks a written artifact before it is published; raises `ArtifactError` if anything is off.

    Files present, both serving signatures with the contract's keys, and the `.keras` file
    reloads (in this process, without custom_objects) into a model that computes the same
    features as `encoder` on a fixed random batch.
    """
    import numpy as np

    from zoo.errors import ArtifactError

    missing = [f for f in REQUIRED_FILES if not tf.io.gfile.exists(f"{directory}/{f}")]
    if missing:
        raise ArtifactError(f"The written artifact in {directory} lacks {missing}; nothing was published.")
    expected = {
        SERVING_DEFAULT: ([IMAGES_KEY], [EMBEDDING_KEY]),
        EMBED_BYTES: ([IMAGE_BYTES_KEY], [EMBEDDING_KEY]),
    }
    found = _signature_keys(f"{directory}/saved_model.pb")
    for signature, keys in expected.items():
        if found.get(signature) != keys:
            raise ArtifactError(f"SavedModel signature {signature} is {found.get(signature)}, expected {keys}.")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, KERAS_FILENAME)
        tf.io.gfile.copy(f"{directory}/{KERAS_FILENAME}", local)
        reloaded = keras.saving.load_model(local, compile=False)
    height, width, channels = encoder_input_shape(encoder)
    images = np.random.default_rng(0).uniform(0, 255, (2, height, width, channels)).astype("float32")
    before = np.asarray(encoder(images, training=False))
    after = np.asarray(reloaded(images, training=False))
    if before.shape != after.shape or not np.allclose(before, after, atol=atol, rtol=1e-5):
        raise ArtifactError(
            "The saved encoder.keras does not reproduce the encoder's features; a custom layer probably "
            "lacks get_config or registration (keras.saving.register_keras_serializable). Nothing was published."
        )
