"""Tiny SavedModels with the zoo's serving signatures, for tests and smoke runs.

`export_toy_model` writes `<base>/<name>/<version>/` with `serving_default` (float images
[N, H, W, C] in [0, 255] -> L2-normalized `embedding` [N, D]) and `embed_bytes` (encoded
JPEG/PNG -> `embedding`), the contract of `zoo.export`. Weights are a function of `seed`, so
two versions answer differently and a test can tell which one replied.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf


class ToyEncoder(tf.Module):
    """Linear projection of the flattened image, L2-normalized."""

    def __init__(self, shape=(8, 8, 1), dim=4, seed=0):
        super().__init__()
        self.shape = tuple(shape)
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.normal(size=(int(np.prod(shape)), dim)).astype("float32"))
        self.bias = tf.Variable(rng.normal(size=(dim,)).astype("float32"))

    def embed(self, images):
        flat = tf.reshape(tf.cast(images, tf.float32) / 255.0, [-1, self.kernel.shape[0]])
        return tf.math.l2_normalize(flat @ self.kernel + self.bias, axis=-1)

    def numpy_embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed(tf.constant(images, tf.float32)).numpy()

    def signatures(self):
        h, w, c = self.shape

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="images")])
        def serving_default(images):
            return {"embedding": self.embed(images)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def embed_bytes(image_bytes):
            def decode(data):
                img = tf.io.decode_image(data, channels=c, expand_animations=False)
                return tf.image.resize(tf.cast(img, tf.float32), (h, w))
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))
            return {"embedding": self.embed(images)}

        return {"serving_default": serving_default, "embed_bytes": embed_bytes}


def export_toy_model(base: str, name: str, version: int, shape=(8, 8, 1), dim=4, seed=None) -> str:
    """Writes the toy SavedModel atomically (temp dir + rename), as a new version should be."""
    module = ToyEncoder(shape, dim, seed=version if seed is None else seed)
    target = os.path.join(base, name, str(version))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=os.path.dirname(target))
    try:
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_example_model(base: str, name: str, version: int) -> str:
    """A TF1-style SavedModel over serialized tf.Examples (float feature "x" of length 2), with a
    classify signature as `serving_default` (classes "cat", "dog"; scores softmax(x)) and a
    regress signature "regress" (sum of x): what Classify, Regress and MultiInference run on."""
    target = os.path.join(base, name, str(version))
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        x = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([2], tf.float32)})["x"]
        classes = tf.tile(tf.constant([["cat", "dog"]]), [tf.shape(x)[0], 1])
        signatures = {
            "serving_default": tf.compat.v1.saved_model.classification_signature_def(
                serialized, classes, tf.nn.softmax(x)),
            "regress": tf.compat.v1.saved_model.regression_signature_def(
                serialized, tf.reduce_sum(x, axis=1, keepdims=True)),
        }
        builder = tf.compat.v1.saved_model.Builder(target)
        builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=signatures)
        builder.save()
    return target


def encode_png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()


def write_broken_version(base: str, name: str, version: int) -> str:
    """A version directory whose saved_model.pb is garbage: loading it must fail cleanly."""
    target = os.path.join(base, name, str(version))
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel")
    return target


def http_call(url: str, method: str = "GET", body=None, timeout: float = 30.0):
    """(status, parsed JSON or text) of one HTTP request; errors are answers, not exceptions."""
    import faulthandler
    import json
    import urllib.error
    import urllib.request

    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except (TimeoutError, urllib.error.URLError) as exc:
        if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
            # In tests the server runs in this process: its threads' stacks say where it stalled.
            faulthandler.dump_traceback(all_threads=True)
        raise
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")
