"""SimCLR, NPID, CPC v2, BYOL, Barlow Twins, DINO: distributed equality, mechanics, learning.

Per recipe: one train step on 1 device and on 2 logical CPU replicas with the same
global batch gives the same loss, gradients and state (`compare_one_vs_two_replicas`);
then the 1-replica recipe keeps training on the *same* views (the step counter is
reset so the stateless augmentation seeds repeat) and its loss on them must drop.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import get_recipe_class
from recipes.contrastive.cpc import CPC, causal_context_network
from recipes.contrastive.npid import NPIDRecipe
from recipes.distillation.byol import cosine_momentum
from recipes.distillation.dino import teacher_temperature
from recipes.heads import WeightNormDense
from tests.distributed_utils import compare_one_vs_two_replicas, float64
from tests.encoders import small_encoder

SHAPE = (16, 16, 1)


def _images(n=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, *SHAPE)).astype("uint8")


def _encoder(norm="batch"):
    return small_encoder(SHAPE, norm)


def _maker(name, norm="batch", **config):
    return lambda: get_recipe_class(name)(_encoder(norm), bn_splits=2, **config)


def _loss_drops_on_fixed_views(recipe, batch, steps=4, learning_rate=0.02):
    """Trains on the views of step 0 again and again; the loss on them must fall."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():  # a gentle optimizer: a few small steps must lower the loss
        recipe.compile(optimizer=keras.optimizers.SGD(learning_rate))
        recipe.optimizer.build(recipe.optimized_variables)
    data = {k: tf.constant(v) for k, v in batch.items()}
    iterations = recipe.optimizer.iterations

    @tf.function
    def step():
        iterations.assign(0)
        strategy.run(recipe.train_step, args=(data,))

    @tf.function
    def loss():
        iterations.assign(0)
        return strategy.run(lambda d: recipe.loss_terms(d)[0], args=(data,))

    before = float(loss())
    for _ in range(steps):
        step()
    after = float(loss())
    assert np.isfinite(after) and after < before, (before, after)


def _trainables(recipe, count=3):
    weights = recipe.optimized_variables
    return [w.value for w in weights[:count]] + [w.value for w in weights[-2:]]


@pytest.fixture(autouse=True)
def _in_float64():
    """Every model here is built and trained in float64 (see `distributed_utils.float64`):
    1 and 2 replicas then agree to 1e-9, where float32 round-off could reach 1e-2."""
    with float64():
        yield


# ---- SimCLR ---------------------------------------------------------------------------
def test_simclr_one_vs_two_replicas_and_learning():
    batch = {"image": _images(16)}
    recipe, _ = compare_one_vs_two_replicas(_maker("simclr", hidden_dim=32, projection_dim=16), batch,
                                            state_fn=_trainables)
    assert recipe.get_config()["temperature"] == 0.5
    _loss_drops_on_fixed_views(recipe, batch)


# ---- NPID -----------------------------------------------------------------------------
def _npid(**config):
    return _maker("npid", dataset_size=40, feature_dim=16, **config)


def test_simclr_health_metric_finds_the_nearest_view_by_cosine_like_the_loss():
    """Row 0's own view 2 points its way but is short; another image's is long and off by 45
    degrees: a raw dot product would pick the long one."""
    from recipes.contrastive.simclr import nearest_view_hits

    z_1 = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    all_z_2 = tf.constant([[0.1, 0.0], [10.0, 10.0], [0.0, 1.0]])  # rows 1, 2 of another replica's batch too
    np.testing.assert_array_equal(nearest_view_hits(z_1, all_z_2).numpy(), [1.0, 0.0])
    np.testing.assert_array_equal(nearest_view_hits(z_1[1:], all_z_2, offset=2).numpy(), [1.0])


def test_npid_one_vs_two_replicas_gathers_bank_updates():
    index = np.random.RandomState(1).permutation(40)[:16].astype("int64")
    batch = {"image": _images(16), "index": index}
    recipe, _ = compare_one_vs_two_replicas(
        _npid(loss="nce", num_negatives=8), batch,
        state_fn=lambda r: [r.memory_bank.value, r.log_normalizer.value] + _trainables(r))
    assert float(recipe.log_normalizer.numpy()) != 0.0  # Z estimated on the first step
    assert NPIDRecipe.needs_index


def test_npid_bank_update_is_proximal_and_normalized():
    recipe = _npid()()
    before = recipe.memory_bank.numpy().copy()
    features = tf.math.l2_normalize(tf.random.stateless_normal((3, 16), [0, 1], dtype=recipe.memory_bank.dtype), axis=1)
    index = tf.constant([5, 0, 39])
    recipe.after_update(None, {"features": features, "index": index, "log_z": None})
    after = recipe.memory_bank.numpy()
    expected = 0.5 * before[[5, 0, 39]] + 0.5 * features.numpy()
    np.testing.assert_allclose(after[[5, 0, 39]], expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(40), [5, 0, 39])
    np.testing.assert_array_equal(after[untouched], before[untouched])


def test_npid_learns_and_asks_for_the_index():
    index = np.arange(16, dtype="int64")
    batch = {"image": _images(16), "index": index}
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        recipe = _npid()()
    recipe.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="with_index=True"):
        recipe.loss_terms({"image": tf.constant(batch["image"])})
    _loss_drops_on_fixed_views(recipe, batch)


# ---- CPC v2 ---------------------------------------------------------------------------
def _cpc():  # CPC v2's layer-norm patch encoder, what recipes.train builds for it; 2 steps on a 3x3 grid
    return _maker("cpc", norm=CPC.backbone_norm, prediction_steps=2, first_step=1, context_dim=16)


def test_cpc_predicts_rows_that_share_no_pixel_with_the_context():
    """8-px patches at stride 4: the row below overlaps the context's row, so the first row
    predicted is 2 by default, and the loss is InfoNCE for k = 2 only (K = 1 on a 3-row grid):
    predictions from context rows 0..G-3, targets in rows 2..G-1."""
    from recipes.losses import cpc_info_nce

    images = _images(2)
    recipe = CPC(_encoder("layer"), prediction_steps=1, context_dim=16)
    assert (recipe.first_step, list(recipe.steps), recipe.predictors[0].name) == (2, [2], "predict_2")
    assert recipe.get_config()["first_step"] == 2
    recipe.compile(optimizer=keras.optimizers.SGD(0.1))
    loss, _ = recipe.loss_terms({"image": tf.constant(images)})
    latents = recipe._latents(tf.constant(images), 2)  # the same step, so the same patch views
    context = recipe.context_network(latents, training=True)
    rows, cols = recipe.rows, recipe.cols
    predictions = recipe.predictors[0](tf.reshape(context[:, :rows - 2], [-1, 16]))
    target = np.array([(b * rows + i) * cols + j for b in range(2) for i in range(2, rows) for j in range(cols)])
    candidates = tf.reshape(latents, [-1, latents.shape[-1]])
    expected = tf.reduce_mean(cpc_info_nce(predictions, candidates, tf.constant(target)))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="Rows 2..3 ahead"):
        CPC(_encoder("layer"), prediction_steps=2)


def test_cpc_one_vs_two_replicas_and_learning():
    batch = {"image": _images(8)}
    # 72 patch rows on one device, 36 per replica: the test that caught crop boxes rounding
    # differently on tensors of different lengths (now computed for the global batch).
    recipe, _ = compare_one_vs_two_replicas(_cpc(), batch, state_fn=_trainables)
    _loss_drops_on_fixed_views(recipe, batch, learning_rate=0.001)  # large patch-sum gradients


def test_cpc_context_is_causal_top_to_bottom():
    network = causal_context_network(dim=4, hidden_dim=8, num_blocks=2)
    latents = np.random.RandomState(0).randn(1, 5, 5, 4).astype("float32")
    changed = latents.copy()
    changed[:, 3] += 10.0  # perturb row 3
    a, b = network(latents).numpy(), network(changed).numpy()
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)  # rows above never see it
    assert not np.allclose(a[:, 3:], b[:, 3:])


def test_cpc_published_encoder_pools_the_patch_encoder_and_reloads(tmp_path):
    recipe = _cpc()()
    assert CPC.backbone_norm == "layer"
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in recipe.patch_encoder.layers)
    images = _images(2)
    assert recipe.encoder.input_shape[1:] == SHAPE
    patches = tf.image.extract_patches(tf.cast(images, tf.float32), [1, 8, 8, 1], [1, 4, 4, 1], [1, 1, 1, 1],
                                       "VALID")
    per_patch = recipe.patch_encoder(tf.reshape(patches, [-1, 8, 8, 1])).numpy().reshape(2, 9, -1)
    np.testing.assert_allclose(recipe.encoder(images).numpy(), per_patch.mean(axis=1), rtol=1e-4, atol=1e-5)
    path = tmp_path / "cpc_encoder.keras"
    recipe.encoder.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(images).numpy(), recipe.encoder(images).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_steps=3"):
        CPC(_encoder(), prediction_steps=3, first_step=1)


# ---- BYOL -----------------------------------------------------------------------------
def test_byol_one_vs_two_replicas_target_ema_and_learning():
    batch = {"image": _images(16)}
    recipe, _ = compare_one_vs_two_replicas(
        _maker("byol", hidden_dim=32, projection_dim=16, total_steps=100), batch,
        state_fn=lambda r: [w.value for w in r.target_projector.trainable_weights] + _trainables(r))
    # The target is not trained by the optimizer and holds the same weights as the online net's EMA.
    target_ids = {id(v) for v in recipe.target_encoder.weights}
    assert not any(id(v) in target_ids for v in recipe.optimized_variables)
    _loss_drops_on_fixed_views(recipe, batch)


def test_byol_momentum_rises_on_a_cosine_from_base_to_one():
    values = [float(cosine_momentum(k, 0.996, 100)) for k in (0, 50, 100, 200)]
    np.testing.assert_allclose(values, [0.996, 0.998, 1.0, 1.0], atol=1e-6)
    assert float(cosine_momentum(70, 0.99, None)) == pytest.approx(0.99)


# ---- Barlow Twins ---------------------------------------------------------------------
def test_barlow_twins_one_vs_two_replicas_global_correlation_and_learning():
    batch = {"image": _images(16)}
    recipe, _ = compare_one_vs_two_replicas(
        _maker("barlow_twins", hidden_dim=32, projection_dim=16, lambda_offdiag=0.05), batch,
        state_fn=_trainables)
    # The loss sums D^2 correlation terms: its gradients are large, so smaller steps.
    _loss_drops_on_fixed_views(recipe, batch, learning_rate=0.002)


# ---- DINO -----------------------------------------------------------------------------
def _dino(**config):
    return _maker("dino", output_dim=32, hidden_dim=32, bottleneck_dim=16, num_local_crops=1, total_steps=100,
                  teacher_temperature_warmup_steps=10, **config)


@pytest.mark.parametrize("head_batch_norm", [False, True])
def test_dino_one_vs_two_replicas_centre_and_teacher(head_batch_norm):
    recipe, _ = compare_one_vs_two_replicas(
        _dino(head_batch_norm=head_batch_norm), {"image": _images(16)},
        state_fn=lambda r: [r.center.value] + [w.value for w in r.teacher_head.trainable_weights] + _trainables(r))
    assert recipe.local_crop_size == 8 and np.abs(recipe.center.numpy()).max() > 0


def test_dino_student_learns_toward_a_still_teacher():
    """Once, not per head variant above: the student learns toward fixed targets only when
    teacher and centre hold still (momentum 1); with them moving, the loss on fixed views need
    not fall in 4 steps."""
    _loss_drops_on_fixed_views(_dino(momentum_base=1.0, center_momentum=1.0)(), {"image": _images(16)})


def test_dino_schedules_and_weight_normalized_prototypes():
    np.testing.assert_allclose([float(teacher_temperature(k, 0.04, 0.07, 30)) for k in (0, 15, 30, 99)],
                               [0.04, 0.055, 0.07, 0.07], atol=1e-6)
    # By default the warm-up covers 30% of the run (0.04 at step 0, as the paper), none without a length.
    assert get_recipe_class("dino")(_encoder(), total_steps=200, output_dim=8, hidden_dim=8,
                                    bottleneck_dim=4, num_local_crops=0).warmup_steps == 60
    fixed = get_recipe_class("dino")(_encoder(), output_dim=8, hidden_dim=8, bottleneck_dim=4, num_local_crops=0)
    assert fixed.warmup_steps == 0 and fixed.get_config()["teacher_temperature_warmup_steps"] is None
    layer = WeightNormDense(5)
    layer.build((None, 3))
    layer.direction.assign(np.random.RandomState(0).randn(3, 5) * 7)
    columns = layer(np.eye(3, dtype="float32")).numpy()  # rows of the effective weight
    np.testing.assert_allclose(np.linalg.norm(columns, axis=0), 1.0, rtol=1e-5)
    assert not layer.magnitude.trainable


def test_dino_head_batch_norm_spreads_images_that_share_one_feature_direction():
    """Pooled post-ReLU features of a fresh ResNet are nearly parallel; without BN every
    image then gets almost the same prototype logits (a uniform teacher, nothing to learn)."""
    from recipes.heads import dino_head

    rng = np.random.RandomState(0)
    features = (5.0 * np.abs(rng.randn(1, 32)) + 0.05 * rng.randn(64, 32)).astype("float64")
    spread = {}
    for batch_norm in (False, True):
        keras.utils.set_random_seed(0)
        logits = dino_head(64, 32, 16, batch_norm=batch_norm)(features, training=True).numpy()
        spread[batch_norm] = logits.std(axis=0).mean()
    assert spread[True] > 5 * spread[False], spread


def test_dino_freezes_the_prototypes_at_the_start():
    recipe = _dino(freeze_last_layer_steps=5)()
    recipe.compile(optimizer=keras.optimizers.SGD(0.1))
    _, gradients, _ = recipe.loss_and_gradients({"image": tf.constant(_images(8))})
    frozen = {id(v) for v in recipe.head.layers[-1].trainable_variables}
    for g, v in zip(gradients, recipe.optimized_variables):
        if id(v) in frozen:
            assert np.abs(g.numpy()).max() == 0
    assert any(np.abs(g.numpy()).max() > 0 for g in gradients)



def test_dino_norm_last_layer_off_trains_the_prototype_norms_and_the_teacher_follows():
    recipe = _dino(norm_last_layer=False, momentum_base=0.5)()
    recipe.compile(optimizer=keras.optimizers.SGD(0.5))
    student, teacher = recipe.head.layers[-1].magnitude, recipe.teacher_head.layers[-1].magnitude
    assert student.trainable and any(v is student for v in recipe.optimized_variables)
    for _ in range(2):
        recipe.train_step({"image": tf.constant(_images(8))})
    moved = np.abs(student.numpy() - 1.0)
    assert moved.max() > 1e-4, "the prototype norms did not train"
    # EMA at momentum 0.5 (the cosine schedule raises it only toward the end of total_steps=100)
    assert 0 < np.abs(teacher.numpy() - 1.0).max() < moved.max()
    assert recipe.get_config()["norm_last_layer"] is False
def test_dino_view_overrides_keep_the_paper_views_and_reject_unknown_views():
    from recipes.augment import DINO_GLOBAL_2, DINO_LOCAL

    dino = get_recipe_class("dino")(_encoder(), num_local_crops=1, output_dim=32, hidden_dim=16, bottleneck_dim=8,
                                    view_policies={"local": {"crop_scale": [0.05, 0.14]}})
    assert dino.view_policies["local"].crop_scale == (0.05, 0.14)
    assert dino.view_policies["local"].blur_p == DINO_LOCAL.blur_p and dino.view_policies["global_2"] == DINO_GLOBAL_2
    with pytest.raises(ValueError, match=r"Unknown DINO view\(s\) \['locals'\].*Known: global_1, global_2, local"):
        get_recipe_class("dino")(_encoder(), view_policies={"locals": {}})


@pytest.mark.parametrize("name, config", [
    ("moco", {"queue_size": 32, "projection_dim": 24, "hidden_dim": 32}),
    ("simclr", {"projection_dim": 24, "hidden_dim": 32}),
    ("npid", {"dataset_size": 64, "feature_dim": 24}),
    ("byol", {"projection_dim": 24, "hidden_dim": 32}),
    ("barlow_twins", {"projection_dim": 24, "hidden_dim": 32}),
    ("dino", {"bottleneck_dim": 24, "hidden_dim": 32, "output_dim": 64, "num_local_crops": 2}),
])
def test_embedding_head_is_the_online_projection_the_loss_compares(name, config):
    recipe = get_recipe_class(name)(_encoder(), **config)
    head = recipe.embedding_head()
    embedding = head(recipe.encoder(_images(4)), training=False)
    assert embedding.shape == (4, 24)
    # The trained online head, not an EMA target copy (those are excluded from the optimizer).
    optimized = {id(v) for v in recipe.optimized_variables}
    assert head.trainable_variables and all(id(v) in optimized for v in head.trainable_variables)
    if name == "dino":  # the bottleneck, L2-normalized, without the prototype layer
        assert not any(isinstance(layer, WeightNormDense) for layer in head.layers)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-6)


def test_cpc_has_no_embedding_head():
    assert _cpc()().embedding_head() is None


@pytest.mark.parametrize("name", ["byol", "dino", "moco"])
def test_weight_decay_spares_biases_and_norms_where_the_paper_does(name):
    """BYOL's and DINO's papers decay weight matrices only, whatever the optimizer; MoCo's
    code decays every parameter. With zero gradients AdamW's step is the decay alone:
    decayed variables shrink by (1 - lr * wd), spared ones stay."""
    recipe = get_recipe_class(name)(_encoder(), **({"queue_size": 64} if name == "moco" else {}))
    recipe.compile(optimizer=keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5))
    variables = recipe.optimized_variables
    before = [v.numpy().copy() for v in variables]
    recipe.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    assert any(len(old.shape) <= 1 for old in before) and any(len(old.shape) > 1 for old in before)
    for old, variable in zip(before, variables):
        decayed = len(old.shape) > 1 or name == "moco"
        np.testing.assert_allclose(variable.numpy(), old * (1 - 0.1 * 0.5 if decayed else 1.0), rtol=1e-5, atol=1e-7)
