"""The zoo's ResNets: layer-norm variant, and stochastic depth (a training-time noise that leaves
inference alone)."""

import keras
import numpy as np
import pytest

from zoo import backbones


@pytest.fixture(scope="module")
def encoder():
    keras.utils.set_random_seed(0)
    return backbones.build("resnet18_small", (16, 16, 1), width=0.125)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (32, 16, 16, 1)).astype("uint8")


def test_drop_rates_grow_linearly_to_the_last_block(encoder):
    noisy = backbones.with_stochastic_depth(encoder, 0.2)
    rates = [layer.rate for layer in noisy.layers if isinstance(layer, backbones.StochasticDepthAdd)]
    np.testing.assert_allclose(rates, [0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2])


def test_inference_is_unchanged_and_training_is_noisy(encoder, images):
    noisy = backbones.with_stochastic_depth(encoder, 0.5)
    np.testing.assert_allclose(noisy(images, training=False), encoder(images, training=False), atol=1e-6)
    first, second = noisy(images, training=True), noisy(images, training=True)
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-3


def test_a_branch_is_kept_scaled_or_dropped_per_example():
    layer = backbones.StochasticDepthAdd(0.25, seed=1)
    shortcut = np.zeros((4000, 1, 1, 2), "float32")
    branch = np.ones((4000, 1, 1, 2), "float32")
    out = np.asarray(layer([shortcut, branch], training=True))
    values = np.unique(out)
    np.testing.assert_allclose(values, [0.0, 1 / 0.75], rtol=1e-6)  # whole rows, inverted scaling
    assert (out[:, 0, 0, 0] == out[:, 0, 0, 1]).all()
    assert abs(np.mean(out[:, 0, 0, 0] == 0.0) - 0.25) < 0.03
    np.testing.assert_array_equal(layer([shortcut, branch], training=False), shortcut + branch)


def test_rate_zero_copy_is_plain_and_bad_rates_are_refused(encoder):
    noisy = backbones.with_stochastic_depth(encoder, 0.3)
    plain = backbones.with_stochastic_depth(noisy, 0.0)
    assert not any(isinstance(layer, backbones.StochasticDepthAdd) for layer in plain.layers)
    for a, b in zip(plain.weights, encoder.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        backbones.StochasticDepthAdd(1.0)


def test_noisy_student_trains_with_stochastic_depth_and_publishes_a_plain_encoder(encoder, images):
    from recipes.semi.noisy_student import NoisyStudent

    student = NoisyStudent(encoder, 3, stochastic_depth=0.2)
    assert sum(isinstance(layer, backbones.StochasticDepthAdd) for layer in student.encoder.layers) == 8
    assert student.get_config()["stochastic_depth"] == 0.2
    exported = student.exported_encoder
    assert not any(isinstance(layer, backbones.StochasticDepthAdd) for layer in exported.layers)
    np.testing.assert_allclose(exported(images), student.encoder(images, training=False), atol=1e-6)


def test_noisy_encoder_saves_and_loads(encoder, images, tmp_path):
    noisy = backbones.with_stochastic_depth(encoder, 0.2)
    noisy.save(tmp_path / "noisy.keras")
    reloaded = keras.saving.load_model(tmp_path / "noisy.keras")
    assert [layer.rate for layer in reloaded.layers if isinstance(layer, backbones.StochasticDepthAdd)][-1] == 0.2
    np.testing.assert_allclose(reloaded(images), encoder(images), atol=1e-6)


def test_an_encoder_without_residual_blocks_is_refused_with_the_way_out():
    images = keras.Input((8, 8, 1))
    flat = keras.Model(images, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(images)))
    with pytest.raises(ValueError, match="rate 0"):
        backbones.with_stochastic_depth(flat, 0.2)


def test_layer_norm_encoder_normalizes_each_example_alone(images, tmp_path):
    keras.utils.set_random_seed(0)
    encoder = backbones.build("resnet18_small", (16, 16, 1), width=0.125, norm="layer")
    assert encoder.name.endswith("_ln")
    kinds = {type(layer) for layer in encoder.layers}
    assert keras.layers.GroupNormalization in kinds and keras.layers.BatchNormalization not in kinds
    # In training mode too, an example's features do not depend on the rest of the batch
    # (with BatchNorm they do): what CPC v2 needs so patches cannot share statistics.
    alone = np.asarray(encoder(images[:4], training=True))
    with_others = np.asarray(encoder(np.concatenate([images[:4], 255 - images[4:]]), training=True))[:4]
    np.testing.assert_allclose(alone, with_others, rtol=1e-5, atol=1e-6)
    batch_norm = backbones.build("resnet18_small", (16, 16, 1), width=0.125)
    assert not np.allclose(batch_norm(images[:4], training=True),
                           np.asarray(batch_norm(np.concatenate([images[:4], 255 - images[4:]]), training=True))[:4])
    encoder.save(tmp_path / "ln.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "ln.keras")(images), encoder(images), atol=1e-6)
    with pytest.raises(ValueError, match="batch, layer"):
        backbones.build("resnet18_small", (16, 16, 1), norm="instance")
