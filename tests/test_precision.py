"""Mixed-precision training (recipes.precision): 16-bit compute, float32 losses, state and
published models, loss scaling under float16."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import recipes  # noqa: F401  (registers every recipe)
from recipes.base import RECIPES, get_recipe_class
from recipes.heads import dino_head
from recipes.losses import info_nce, l2_normalize
from recipes.precision import computes_in_float32, global_policy
from tests.distributed_utils import float64
from tests.encoders import small_encoder
from tests.test_train_cli import SMALL, _env, _train
from zoo import backbones
from zoo.export import with_dtype_policy, without_mixed_precision

LABEL_RECIPES = {"finetune", "pseudo_label", "noisy_student", "fixmatch"}
SMALL_HPARAMS = {"moco": {"queue_size": 64}, "swav": {"queue_size": 0},
                 "jigsaw": {"num_permutations": 10, "tile_dim": 8, "hidden_dim": 16},
                 "context": {"tile_dim": 8, "hidden_dim": 16}, "sela": {"num_clusters": 4, "num_heads": 2},
                 "deepcluster": {"num_clusters": 4, "hidden_dim": 16},
                 "cpc": {"prediction_steps": 2, "first_step": 1, "context_dim": 16}}


def test_losses_compute_in_float32_on_half_precision_inputs():
    rng = np.random.RandomState(0)
    q, k, negatives = (tf.constant(rng.randn(*shape), tf.bfloat16) for shape in ((4, 8), (4, 8), (16, 8)))
    got = info_nce(l2_normalize(q), l2_normalize(k), l2_normalize(negatives), 0.07)
    assert got.dtype == tf.float32 and l2_normalize(tf.cast(q, tf.float16)).dtype == tf.float32
    # The same as float32 math on the (already rounded) bfloat16 values, not bfloat16 math.
    as_float32 = [l2_normalize(tf.cast(x, tf.float32)) for x in (q, k, negatives)]
    np.testing.assert_allclose(got.numpy(), info_nce(*as_float32, 0.07).numpy(), rtol=1e-6)

    @computes_in_float32
    def dtypes(*args, **kwargs):
        return tf.nest.map_structure(lambda x: getattr(x, "dtype", type(x)), (args, kwargs))

    args, kwargs = dtypes([tf.zeros(2, tf.bfloat16)], tf.zeros(2, tf.float64), tf.zeros(2, tf.int32), 3.0,
                          x=tf.zeros(2, tf.float16))
    assert args == ([tf.float32], tf.float64, tf.int32, float) and kwargs == {"x": tf.float32}


def _batch(name, shape, rng):
    images = rng.randint(0, 256, (16, *shape)).astype("uint8")
    if name == "fixmatch":
        return {"image": images, "label": rng.randint(0, 4, 16),
                "unlabelled_image": rng.randint(0, 256, (32, *shape)).astype("uint8")}
    return {"image": images, "index": np.arange(16), "label": rng.randint(0, 4, 16)}


def _recipe(name, policy, **hparams):
    with global_policy(policy):
        cls = get_recipe_class(name)
        shape = (32, 32, 3) if name == "colorization" else (16, 16, 1)
        encoder = backbones.build("vit_tiny_p4", shape) if name == "mae" else small_encoder(shape, cls.backbone_norm)
        kwargs = {**SMALL_HPARAMS.get(name, {}), **cls.run_facts(10, 64), **hparams}
        if name in LABEL_RECIPES:
            kwargs.update(num_classes=4, **({"mu": 2} if name == "fixmatch" else {}))
        return cls(encoder, **kwargs), shape


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_in_mixed_bfloat16_with_float32_weights_and_state(name):
    recipe, shape = _recipe(name, "mixed_bfloat16")
    rng = np.random.RandomState(0)
    recipe.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    assert recipe.encoder.layers[-1].compute_dtype == "bfloat16"
    before = [v.numpy().copy() for v in recipe.optimized_variables]
    callbacks = recipe.training_callbacks(rng.randint(0, 256, (64, *shape)).astype("uint8"))
    history = recipe.fit(tf.data.Dataset.from_tensors(_batch(name, shape, rng)).repeat(2), epochs=1, verbose=0,
                         callbacks=callbacks)
    assert np.isfinite(history.history["loss"][-1])
    # The loss itself is float32 math (recipes.losses), not bfloat16's 8-bit mantissa.
    loss, _ = recipe.loss_terms({k: tf.constant(v) for k, v in _batch(name, shape, rng).items()})
    assert loss.dtype == tf.float32
    # Weights, EMA targets, queues, memory banks, centres: all float32.
    assert {v.dtype for v in recipe.variables if "float" in v.dtype} == {"float32"}
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, recipe.optimized_variables))


def test_mixed_float16_scales_the_loss_and_steps_like_float32():
    """One SGD step from the same weights and batch: float16 with loss scaling moves the
    weights as float32 does. Without scaling (or without unscaling) the update would be
    lost to underflow or be 2^15 times too large."""
    rng = np.random.RandomState(0)
    batch = {k: tf.constant(v) for k, v in _batch("simclr", (16, 16, 1), rng).items()}
    updates = {}
    for policy in ("float32", "mixed_float16"):
        keras.utils.set_random_seed(0)
        recipe, _ = _recipe("simclr", policy)
        recipe.compile(optimizer=keras.optimizers.SGD(1.0))
        assert isinstance(recipe.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
        before = [v.numpy().copy() for v in recipe.optimized_variables]
        recipe.train_step(batch)
        updates[policy] = np.concatenate([(v.numpy() - b).ravel() for b, v in zip(before, recipe.optimized_variables)])
    reference, half = updates["float32"], updates["mixed_float16"]
    assert np.linalg.norm(reference) > 0
    assert np.linalg.norm(half - reference) / np.linalg.norm(reference) < 0.05


@pytest.mark.parametrize("build", [
    lambda: backbones.build("resnet18_small", (16, 16, 1), 0.125),
    lambda: backbones.build("resnet18_small", (16, 16, 1), 0.125, norm="layer"),
    lambda: backbones.build("vit_tiny_p4", (16, 16, 1)),
    lambda: get_recipe_class("cpc")(small_encoder((16, 16, 1), "layer"), **SMALL_HPARAMS["cpc"]).encoder,
], ids=["resnet", "resnet_layer_norm", "vit", "cpc_patch_grid"])
def test_with_dtype_policy_copies_weights_into_float32_layers(build):
    with global_policy("mixed_bfloat16"):
        mixed = build()
    copy = with_dtype_policy(mixed, "float32")
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    assert copy.output.dtype == "float32" and mixed.output.dtype == "bfloat16"
    for a, b in zip(mixed.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
    images = np.random.RandomState(1).randint(0, 256, (4, 16, 16, 1)).astype("float32")
    expected, got = copy(images).numpy(), mixed(images).numpy().astype("float32")
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()  # bfloat16's rounding only
    assert with_dtype_policy(copy, "float32") is copy and without_mixed_precision(copy) is copy
    assert without_mixed_precision(mixed).output.dtype == "float32"
    back = with_dtype_policy(copy, "mixed_bfloat16")
    assert back.output.dtype == "bfloat16"


def test_only_mixed_models_are_copied_for_publishing():
    with float64():
        exact = small_encoder()
    assert without_mixed_precision(exact) is exact  # a float64 model is not rounded to float32


@pytest.mark.parametrize("head", ["dino", "swav"])
def test_l2_normalization_layers_stay_finite_under_mixed_float16(head):
    """In float16 a squared norm overflows past ~256 per coordinate of an 8-d row and Keras's
    epsilon 1e-12 underflows to 0: a float16 UnitNormalization returns zeros and NaN here."""
    with global_policy("mixed_float16"):
        if head == "dino":
            model = dino_head(output_dim=16, hidden_dim=32, bottleneck_dim=8)
            model.build((None, 4))
            l2 = model.get_layer("dino_head_l2")
        else:
            model = get_recipe_class("swav")(small_encoder(), num_prototypes=8, hidden_dim=16, projection_dim=8,
                                             queue_size=0).embedding_head()
            l2 = model.layers[-1]
    rows = np.zeros((3, 8), "float32")
    rows[1], rows[2] = 1.0, 300.0  # a zero row, a small one, one whose float16 squared norm is inf
    normalized = l2(rows).numpy()
    np.testing.assert_allclose(np.linalg.norm(normalized[1:], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(normalized[0], 0.0)
    assert model.layers[0].compute_dtype == "float16"  # the rest of the head still computes in float16


def test_the_precision_flag_offers_the_policies_recipes_know():
    from absl import flags

    import recipes.train  # noqa: F401  (defines the flags; it imports TensorFlow lazily, so it lists them itself)
    from recipes.precision import POLICIES

    assert flags.FLAGS["precision"].parser.enum_values == list(POLICIES)


def test_cli_trains_mixed_and_publishes_float32(tmp_path):
    env = _env(tmp_path / "tfds", ZOO_HOME=str(tmp_path / "zoo"))
    args = [*SMALL, "--epochs=1", "--precision=mixed_bfloat16", f"--model_dir={tmp_path / 'run'}",
            "--publish_as=tiny_mixed"]
    result = _train(args, env)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert run["precision"] == "mixed_bfloat16" and launch["definition"]["precision"] == "mixed_bfloat16"
    encoder = keras.saving.load_model(tmp_path / "run" / "encoder.keras", compile=False)
    assert {layer.dtype_policy.name for layer in encoder._flatten_layers()} == {"float32"}
    published = keras.saving.load_model(next((tmp_path / "zoo").rglob("encoder.keras")), compile=False)
    assert {layer.dtype_policy.name for layer in published._flatten_layers()} == {"float32"}
    # A float32 rerun of the mixed run is another run: refused, not spliced.
    refused = _train([*args[:-3], f"--model_dir={tmp_path / 'run'}"], env)
    assert refused.returncode == 2 and "precision: 'mixed_bfloat16' then, None now" in refused.stderr, \
        refused.stderr[-2000:]


def test_mixed_float16_step_on_two_replicas_matches_one():
    """The loss-scale optimizer under MirroredStrategy: scaled gradients are summed over the
    replicas, unscaled once, and the step equals one device's up to float16 rounding."""
    from tests.distributed_utils import build_recipe, train_step, two_replica_strategy

    batch = _batch("simclr", (16, 16, 1), np.random.RandomState(0))
    batch = {"image": batch["image"]}
    make = lambda: _recipe("simclr", "mixed_float16", bn_splits=2)[0]  # noqa: E731  (the same BN groups on both)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    one = build_recipe(one_device, make)
    two = build_recipe(two_replica_strategy(), make, weights=one.get_weights())
    assert isinstance(two.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [v.numpy().copy() for v in one.optimized_variables]
    train_step(one_device, one, batch)
    train_step(two_replica_strategy(), two, batch)
    update_1, update_2 = (np.concatenate([(v.numpy() - b).ravel() for b, v in zip(before, r.optimized_variables)])
                          for r in (one, two))
    assert np.linalg.norm(update_1) > 0
    assert np.linalg.norm(update_2 - update_1) / np.linalg.norm(update_1) < 0.05


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_step_the_loss_scaler_skips_changes_nothing_but_the_scale(replicas):
    """Under mixed_float16 a step whose scaled gradients overflow is skipped whole: MoCo's
    weights, queue, key encoder and BN statistics stay as they were, and the scale halves."""
    from tests.distributed_utils import build_recipe, train_step, two_replica_strategy

    strategy = two_replica_strategy() if replicas == 2 else tf.distribute.OneDeviceStrategy("/cpu:0")
    batch = {"image": _batch("moco", (16, 16, 1), np.random.RandomState(0))["image"]}
    recipe = build_recipe(strategy, lambda: _recipe("moco", "mixed_float16", bn_splits=2)[0])
    snapshot = lambda: [v.numpy().copy() for v in recipe.step_state() + recipe.optimized_variables]  # noqa: E731
    assert any("queue" in v.path for v in recipe.step_state())
    train_step(strategy, recipe, batch)
    before, scale = snapshot(), float(recipe.optimizer.dynamic_scale.numpy())
    queue = recipe.queue.keys.numpy().copy()
    recipe.optimizer.dynamic_scale.assign(1e37)  # finite in float32; the float16 gradients overflow
    train_step(strategy, recipe, batch)
    assert int(recipe.optimizer.iterations.numpy()) == 1
    assert float(recipe.optimizer.dynamic_scale.numpy()) == pytest.approx(5e36)
    for old, new in zip(before, snapshot()):
        np.testing.assert_array_equal(new, old)
    recipe.optimizer.dynamic_scale.assign(scale)
    train_step(strategy, recipe, batch)  # a finite step moves all of it again
    assert int(recipe.optimizer.iterations.numpy()) == 2
    assert all(np.isfinite(new).all() for new in snapshot())
    assert not np.array_equal(recipe.queue.keys.numpy(), queue)
