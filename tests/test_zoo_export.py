"""The SavedModel serving contract: both signatures answer exactly what the Keras encoder does."""

import numpy as np
import pytest
import tensorflow as tf

from zoo import backbones, export
from zoo.images import fit_image


@pytest.fixture(scope="module")
def encoder():
    return backbones.build("resnet18_small", (16, 16, 3), width=0.125)


def _reference(encoder, images):
    features = encoder.predict(images.astype("float32"), verbose=0)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_both_signatures_match_keras_encoder(encoder, tmp_path):
    path = export.export_saved_model(encoder, str(tmp_path / "m"))
    assert path.endswith("/m/1")
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "embed_bytes"}

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("uint8")
    expected = _reference(encoder, images)
    by_pixels = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))["embedding"]
    pngs = tf.stack([tf.io.encode_png(image) for image in images])
    by_bytes = loaded.signatures["embed_bytes"](image_bytes=pngs)["embedding"]
    np.testing.assert_allclose(by_pixels.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(by_bytes.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(by_pixels.numpy(), axis=1), 1.0, atol=1e-5)


def test_bytes_signature_fits_other_sizes_as_training_did_and_converts_channels(tmp_path):
    small = backbones.build("resnet18_small", (16, 16, 1), width=0.125)
    path = export.export_saved_model(small, str(tmp_path / "gray"), version=7)
    signature = tf.saved_model.load(path).signatures["embed_bytes"]
    tall = np.random.default_rng(1).integers(0, 256, (40, 24, 1)).astype(np.uint8)
    served = signature(image_bytes=tf.stack([tf.io.encode_png(tall)]))["embedding"].numpy()
    # what recipes.image_folder gives training: scaled to cover 16 x 16, the centre cut out
    np.testing.assert_allclose(served, _reference(small, fit_image(tall, 16, 16).numpy()[None]), atol=1e-5)
    rgb_jpeg = tf.io.encode_jpeg(np.full((40, 24, 3), 128, np.uint8))  # colour in, grey model
    assert signature(image_bytes=tf.stack([rgb_jpeg]))["embedding"].shape == (1, small.output_shape[-1])


def test_fit_image_keeps_an_exact_size_and_crops_the_centre_of_others():
    exact = np.random.default_rng(0).integers(0, 256, (5, 7, 1)).astype(np.uint8)
    np.testing.assert_array_equal(fit_image(exact, 5, 7).numpy(), exact)
    rows = np.repeat(np.arange(30, dtype=np.float32)[:, None], 10, axis=1)[..., None]  # 30 x 10, value = row
    fitted = fit_image(rows, 6, 2).numpy()  # scale 1/5 -> 6 x 2: nothing to crop
    np.testing.assert_allclose(fitted[1:-1, 0, 0], 5 * np.arange(1, 5) + 2, atol=1e-3)  # edges: filter clamped
    fitted = fit_image(rows, 4, 4).numpy()  # scale 2/5 -> 12 x 4, rows 4..7 kept
    np.testing.assert_allclose(fitted[:, 1, 0], 2.5 * np.arange(4, 8) + 0.75, atol=0.02)


def test_versions_count_up_and_never_overwrite(encoder, tmp_path):
    base = str(tmp_path / "m")
    assert export.export_saved_model(encoder, base, version=3).endswith("/3")
    assert export.export_saved_model(encoder, base).endswith("/4")
    with pytest.raises(FileExistsError):
        export.export_saved_model(encoder, base, version=3)
    with pytest.raises(ValueError, match="positive integer"):
        export.export_saved_model(encoder, base, version=0)
    assert export.versions_in(base) == [3, 4]
    assert not [p for p in tf.io.gfile.listdir(base) if p.startswith(".tmp")]


def test_rejects_non_pooled_encoder(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 1))
    spatial = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="pooled features"):
        export.export_saved_model(spatial, str(tmp_path / "bad"))


def test_a_frozen_model_is_saved_trainable_and_stays_frozen(tmp_path):
    """FixMatch publishes its EMA encoder, frozen for training; the zoo's file must load
    trainable (Keras records the flag), and the recipe's model must stay frozen."""
    import keras

    encoder = backbones.build("resnet18_small", (16, 16, 1), width=0.125)
    encoder.trainable = False
    path = export.write_keras(encoder, str(tmp_path / "encoder.keras"))
    assert not encoder.trainable and not encoder.trainable_weights
    loaded = keras.saving.load_model(path)
    assert loaded.trainable and len(loaded.trainable_weights) == len(encoder.weights) - sum(
        len(layer.non_trainable_weights) for layer in loaded.layers if isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "PNG", "JPEG"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_grey_model_decodes_every_format_it_advertises(fmt, mode):
    """TF's GIF and BMP decoders refuse channels=1: a grey model's `embed_bytes` must still
    read them (via RGB), in grey or colour files; PNG and JPEG keep their own grey path."""
    import io

    from PIL import Image

    from zoo.images import decode_image

    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # columns 0..240
    buffer = io.BytesIO()
    Image.fromarray(grey).convert(mode).save(buffer, format=fmt)
    decoded = decode_image(tf.constant(buffer.getvalue()), 1).numpy()
    assert decoded.shape == (16, 16, 1) and decoded.dtype == np.uint8
    tolerance = 8 if fmt == "JPEG" else 1  # lossy JPEG; RGB -> grey rounding
    assert np.abs(decoded[..., 0].astype(int) - grey).max() <= tolerance
