"""Masked image modelling (MAE) and the ViT encoders it needs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import get_recipe_class
from recipes.masked.mae import patchify, random_masking
from tests.distributed_utils import compare_one_vs_two_replicas, float64
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables
from zoo import backbones, export, vit

SHAPE = (16, 16, 1)


def _vit():
    return backbones.build("vit_tiny_p4", SHAPE, width=0.25, depth=2)


def test_vit_encoder_pools_tokens_saves_reloads_and_serves(tmp_path):
    encoder = _vit()
    assert encoder.output_shape == (None, 48) and len(vit.transformer_blocks(encoder)) == 2
    images = np.random.RandomState(0).randint(0, 256, (3, *SHAPE)).astype("uint8")
    encoder.save(tmp_path / "vit.keras")
    reloaded = keras.saving.load_model(tmp_path / "vit.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), encoder.predict(images, verbose=0), atol=1e-6)
    served = tf.saved_model.load(export.export_saved_model(encoder, str(tmp_path / "m")))
    features = encoder.predict(images, verbose=0)
    np.testing.assert_allclose(served.signatures["serving_default"](images=tf.constant(images, tf.float32))["embedding"],
                               features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        backbones.build("vit_tiny_p4", (18, 18, 1), width=0.25)


@pytest.mark.parametrize("name, shape", [("vit_tiny_p4", (28, 28, 1)), ("vit_tiny_p16", (32, 32, 3))])
def test_patch_embedding_is_initialized_as_maes_linear_layer(name, shape):
    """MAE draws the patch embedding as a Linear layer on the flattened patch (Glorot-uniform with
    fans C * p * p and dim), not as a convolution (fans times p * p, several times smaller)."""
    keras.utils.set_random_seed(0)
    kernel = backbones.build(name, shape, width=1.0, depth=1).get_layer("patch_embed").kernel.numpy()
    patch, channels, dim = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    assert (channels, dim) == (shape[-1], 192)
    limit = np.sqrt(6.0 / (channels * patch * patch + dim))
    assert limit > 3 * np.sqrt(6.0 / (patch * patch * (channels + dim)))  # Keras's Conv2D Glorot limit
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.99 * limit
    np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3.0), rtol=0.05)  # a uniform's std
    np.testing.assert_allclose(kernel.mean(), 0.0, atol=0.05 * limit)


def test_sincos_table_encodes_row_and_column_apart():
    table = vit.sincos_position_table(2, 3, 8)  # half the dims: row, half: column
    assert table.shape == (6, 8)
    np.testing.assert_allclose(table[:3, :4], np.tile(table[0, :4], (3, 1)))  # row 0 shares the row half
    np.testing.assert_allclose(table[::3, 4:], np.tile(table[0, 4:], (2, 1)))  # column 0 shares the column half
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1])  # sin 0, cos 0


def test_patchify_lays_patches_out_in_token_order():
    images = np.arange(2 * 4 * 6 * 1, dtype=np.float32).reshape(2, 4, 6, 1)
    patches = patchify(tf.constant(images), 2).numpy()
    assert patches.shape == (2, 6, 4)
    np.testing.assert_array_equal(patches[1, 4], images[1, 2:4, 2:4, 0].reshape(-1))  # row 1, column 1


def test_random_masking_keeps_the_lowest_noise_patches_and_restores_order():
    noise = tf.constant([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    keep, restore, mask = random_masking(noise, 1)
    np.testing.assert_array_equal(keep, [[1], [0]])
    np.testing.assert_array_equal(mask, [[1, 0, 1, 1], [0, 1, 1, 1]])
    shuffled = tf.gather(tf.constant([[10, 11, 12, 13]] * 2), tf.argsort(noise, axis=1), batch_dims=1)
    np.testing.assert_array_equal(tf.gather(shuffled, restore, batch_dims=1), [[10, 11, 12, 13]] * 2)


def test_mae_one_vs_two_replicas_and_learning():
    batch = {"image": np.random.RandomState(1).randint(0, 256, (8, *SHAPE)).astype("uint8")}
    with float64():
        recipe, _ = compare_one_vs_two_replicas(
            lambda: get_recipe_class("mae")(_vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2), batch,
            state_fn=_trainables)
        assert recipe.num_keep == 4 and recipe.get_config()["mask_ratio"] == 0.75
        _loss_drops_on_fixed_views(recipe, batch, learning_rate=0.05)


def test_mae_exempts_biases_and_norms_from_weight_decay():
    """The paper's AdamW decays weight matrices only (timm's rule: no 1-D parameter). With zero
    gradients AdamW's step is the decay alone: matrices shrink by (1 - lr * wd), 1-D ones stay."""
    recipe = get_recipe_class("mae")(_vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    recipe.compile(optimizer=keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5))
    variables = recipe.optimized_variables
    before = [v.numpy().copy() for v in variables]
    recipe.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    vectors = [(b, v.numpy()) for b, v in zip(before, variables) if len(b.shape) <= 1]
    matrices = [(b, v.numpy()) for b, v in zip(before, variables) if len(b.shape) > 1]
    assert vectors and matrices
    for old, new in vectors:
        np.testing.assert_array_equal(new, old)
    for old, new in matrices:
        np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5), rtol=1e-5, atol=1e-7)


def test_mae_refuses_an_encoder_without_patches():
    with pytest.raises(ValueError, match="vit_tiny_p4"):
        get_recipe_class("mae")(backbones.build("resnet18_small", SHAPE, width=0.125))


@pytest.mark.parametrize("recipe, hparams", [("dino", {"num_local_crops": 2}), ("jigsaw", {}), ("counting", {}),
                                             ("cpc", {"prediction_steps": 1})])
def test_recipes_that_resize_the_encoder_refuse_a_vit_by_name(recipe, hparams):
    """Local crops, tiles and patches run the encoder at another size, which a ViT's fixed
    position table cannot take: a clear error at construction, not a shape error mid-graph."""
    with pytest.raises(ValueError, match="Vision Transformer.*convolutional backbone"):
        get_recipe_class(recipe)(_vit(), **hparams)
