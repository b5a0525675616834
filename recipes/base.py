"""What every recipe shares: the registry, the train-step skeleton and its state.

A recipe is a `keras.Model` whose `train_step` turns a batch of uint8 images into
views, a loss and an update. This base owns the mechanics that several methods
share, so that a recipe file states only what makes its method different:

* `loss_and_gradients`: loss scaled by the *global* batch + gradients, the
  quantities the 1-vs-2-replica tests compare;
* `step_seed`: stateless per-step, per-view seeds, equal on every replica;
* `encode_in_groups`: batch-norm statistics over fixed groups of the global batch
  ("split BN"), the single-device equivalent of MoCo's per-GPU shuffle BN, and the
  same computation on 1 or N replicas;
* `momentum_update`: EMA targets (MoCo's key encoder, BYOL's target, DINO's teacher);
* `FeatureQueue`: a FIFO of keys/features as a non-trainable variable.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from recipes import distribute, precision

RECIPES: dict[str, type] = {}


def register(name: str):
    """Class decorator: makes a recipe trainable as `--recipe=name`."""

    def decorate(cls):
        RECIPES[name] = cls
        cls.recipe_name = name
        return keras.saving.register_keras_serializable(package="ssl_recipes", name=name)(cls)

    return decorate


def get_recipe_class(name: str) -> type:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Valid recipes: {', '.join(sorted(RECIPES))}.")
    return RECIPES[name]


def copy_as_target(model: keras.Model) -> keras.Model:
    """A copy of `model` with the same weights: the start of an EMA target.

    The copy stays `trainable` on purpose: a Keras BatchNormalization layer with
    trainable=False runs in inference mode, but EMA targets (MoCo's key encoder,
    BYOL's target, DINO's teacher) normalize with the statistics of the batch like
    the online network. Recipes keep the target out of the optimizer by listing it
    in `Recipe.target_models` instead.
    """
    target = keras.models.clone_model(model)
    target.set_weights(model.get_weights())
    return target


class Recipe(keras.Model):
    """Base class: an encoder plus whatever a method trains around it.

    Subclasses implement `loss_terms(data) -> (per-replica loss, state dict)` and may
    override `before_update(data)` / `after_update(data, state)` for non-gradient
    state (EMA targets, queues, memory banks).

    Args:
      encoder: the `keras.Model` being pretrained (images in [0, 255] -> features).
      seed: base of the stateless augmentation seeds.
    """

    recipe_name = "base"
    # Normalization of the backbone `recipes.train` builds for this recipe (zoo.backbones.NORMS).
    backbone_norm = "batch"
    # Whether batches must carry "index" (each image's position in the dataset; NPID's memory bank).
    needs_index = False
    # Whether the recipe schedules something over the run's length and takes `total_steps`
    # (BYOL's and DINO's momentum cosine, SeLa's label steps).
    needs_total_steps = False
    # Whether the optimizer's weight decay reaches the 1-D variables (biases, BN and LN scales
    # and offsets). BYOL's, DINO's and MAE's papers exempt them whatever the optimizer; LARS
    # (recipes.optimizers) exempts them in every recipe.
    decay_vectors = True

    @classmethod
    def run_facts(cls, total_steps, dataset_size) -> dict:
        """The constructor keywords this recipe needs from the run (`needs_total_steps`, `needs_index`)."""
        return {**({"total_steps": total_steps} if cls.needs_total_steps else {}),
                **({"dataset_size": dataset_size} if cls.needs_index else {})}

    def __init__(self, encoder: keras.Model, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.seed = int(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def compile(self, optimizer="rmsprop", **kwargs):
        """Keras's compile; under the mixed_float16 policy the optimizer is wrapped for loss
        scaling (`recipes.precision`); without `decay_vectors` the 1-D variables are exempt
        from its weight decay."""
        optimizer = precision.optimizer_for(keras.optimizers.get(optimizer), self.dtype_policy.name)
        super().compile(optimizer=optimizer, **kwargs)
        if not self.decay_vectors:
            precision.inner_optimizer(self.optimizer).exclude_from_weight_decay(
                var_list=[v for v in self.optimized_variables if len(v.shape) <= 1])

    # ---- configuration (what a zoo card records) -------------------------------
    def get_config(self) -> dict:
        """Hyperparameters only; the encoder is recorded by the run as backbone + width."""
        return {"seed": self.seed}

    # ---- helpers for subclasses ---------------------------------------------
    @property
    def num_replicas(self) -> int:
        return distribute.num_replicas()

    def global_batch(self, local_tensor) -> int:
        rows = local_tensor.shape[0]
        if rows is None:
            raise ValueError("Recipes need a static batch size: batch with drop_remainder=True.")
        return rows * self.num_replicas

    def dataset_index(self, data):
        """The batch's dataset indices, int32: the rows of a `needs_index` recipe's per-image
        state (NPID's memory bank, SeLa's and DeepCluster's labels)."""
        if "index" not in data:
            raise ValueError(f"{type(self).__name__} needs each image's dataset index: build the dataset with "
                             "recipes.data.make_dataset(..., with_index=True).")
        return tf.cast(data["index"], tf.int32)

    def step_seed(self, view: int):
        """An int32[2] stateless seed for (this step, this view), equal on all replicas."""
        step = tf.cast(self.optimizer.iterations, tf.int32)
        seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int32), step)
        return tf.random.experimental.stateless_fold_in(seed, view)

    def encode_in_groups(self, model, x, bn_splits: int, training: bool = True):
        """Runs `model` on `bn_splits` equal groups of the global batch.

        BatchNorm then normalizes each group with its own statistics, whether the
        groups live on one device or on several replicas.
        """
        if bn_splits % self.num_replicas:
            raise ValueError(f"bn_splits={bn_splits} must be a multiple of the {self.num_replicas} replicas.")
        groups = bn_splits // self.num_replicas
        if groups == 1:
            return model(x, training=training)
        if x.shape[0] % groups:
            raise ValueError(f"Per-replica batch {x.shape[0]} is not divisible into {groups} BN groups.")
        return tf.concat([model(part, training=training) for part in tf.split(x, groups)], axis=0)

    def momentum_update(self, pairs, momentum):
        """target <- m * target + (1 - m) * online, for every (online, target) model pair."""
        targets, values = [], []
        for online, target in pairs:
            for w_online, w_target in zip(online.weights, target.weights):
                # Only parameters: the target's BN statistics come from its own forward passes.
                if w_online.trainable:
                    targets.append(w_target)
                    m = tf.cast(momentum, w_target.dtype)
                    values.append(m * w_target.value + (1.0 - m) * w_online.value)
        distribute.assign_synced(targets, values)

    def frozen_until(self, gradients, layer, steps: int):
        """`gradients` (of `optimized_variables`) with `layer`'s zeroed before optimizer step
        `steps`: DINO's last layer and SwAV's prototypes stay still at the start of training."""
        if steps <= 0:
            return gradients
        frozen = {id(v) for v in layer.trainable_variables}
        keep = self.optimizer.iterations >= steps
        return [g * tf.cast(keep, g.dtype) if id(v) in frozen else g
                for g, v in zip(gradients, self.optimized_variables)]

    def training_callbacks(self, images) -> list:
        """Keras callbacks the method needs beside `train_step`, given the training images
        (uint8 [N, H, W, C]): SeLa's label step and DeepCluster's clustering, which need the
        whole dataset. Pass them to `fit`; `recipes.train` does."""
        return []

    def embedding_head(self):
        """Encoder features -> the embedding the loss compares (MoCo's 128-d projection), or None.

        InstDisc's kNN protocol (Wu et al. 2018) classifies with that L2-normalized
        embedding, so runs report kNN on it beside kNN on the encoder's pooled features
        (what the zoo publishes). Recipes without such an embedding (CPC) return None.
        """
        return None

    # ---- what the optimizer updates -----------------------------------------
    def target_models(self) -> list:
        """Sub-models updated without gradients (EMA targets); overridden by such recipes.

        They stay `trainable` as Keras layers on purpose: a non-trainable Keras
        BatchNormalization runs in inference mode, and a key encoder or target
        network must normalize with batch statistics like the online one.
        """
        return []

    @property
    def optimized_variables(self):
        """Trainable variables minus those of the target models."""
        excluded = {id(v) for model in self.target_models() for v in model.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in excluded]

    # ---- the train step -------------------------------------------------------
    def loss_terms(self, data):
        raise NotImplementedError

    def before_update(self, data):
        """State updates that precede the loss (MoCo updates its key encoder first)."""
        return None

    def after_update(self, data, state):
        """State updates after the gradient step (queues, memory banks)."""
        return None

    @property
    def metrics(self):
        """What the progress bar shows; recipes with more trackers extend this list."""
        return [self.loss_tracker]

    def loss_and_gradients(self, data):
        """Per-replica loss (already divided by the global batch) and its gradients."""
        with tf.GradientTape() as tape:
            loss, state = self.loss_terms(data)
            # Identity unless mixed_float16's LossScaleOptimizer (recipes.precision), whose
            # apply_gradients divides the scale out again.
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.optimized_variables)
        return loss, gradients, state

    def step_state(self) -> list:
        """What a train step changes besides the optimized weights and the optimizer's slots:
        BatchNorm statistics, EMA targets, queues, memory banks, centres."""
        state = self.non_trainable_weights + [v for model in self.target_models() for v in model.trainable_weights]
        return list({id(v): v for v in state}.values())

    def train_step(self, data):
        # Under mixed_float16 the loss-scale optimizer skips a step whose gradients are not
        # finite (and halves the scale); the step's other updates are then undone as well, so
        # no queue, bank, EMA target or BN statistic keeps what a skipped step computed.
        skippable = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        if skippable:
            state_variables = self.step_state()
            saved = [tf.identity(v.value) for v in state_variables]
            steps_before = tf.identity(self.optimizer.iterations.value)
        self.before_update(data)
        loss, gradients, state = self.loss_and_gradients(data)
        self.optimizer.apply_gradients(zip(gradients, self.optimized_variables))
        self.after_update(data, state)
        if skippable:
            applied = self.optimizer.iterations.value > steps_before
            distribute.assign_synced(state_variables,
                                     [tf.where(applied, v.value, old) for v, old in zip(state_variables, saved)])
        # Each replica's loss is a share of the global mean; the tracker averages replicas.
        self.loss_tracker.update_state(loss * self.num_replicas)
        logs = {"loss": self.loss_tracker.result()}
        for metric in self.metrics:
            if metric is not self.loss_tracker:
                logs[metric.name] = metric.result()
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 reduces logs across workers with a hard-coded MEAN over axis 0,
            # which fails on scalars; shape [1] reduces to the same scalar.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def test_step(self, data):
        raise NotImplementedError("Recipes are evaluated with recipes.evaluate (kNN / linear probe).")

    def build(self, input_shape=None):
        """Sub-models are built in __init__; nothing is left to infer from data."""
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Skips Keras's build-from-a-batch under a strategy (a private Keras 3.15 hook).

        It would MEAN-reduce a uint8 batch across workers only to build layers that
        already exist, and that reduction fails under MultiWorkerMirroredStrategy.
        """

    def call(self, data, training=False):
        images = data["image"] if isinstance(data, dict) else data
        return self.encoder(images, training=training)


class FeatureQueue(keras.layers.Layer):
    """A FIFO of L2-normalized feature vectors kept as non-trainable variables.

    MoCo's dictionary (He et al. 2020, sec. 3.2): the keys of the most recent
    batches serve as negatives, decoupling the number of negatives from the batch.
    Enqueued in global-batch order, so every replica holds the same queue.
    """

    def __init__(self, size: int, dim: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.dim = size, dim
        initial = tf.math.l2_normalize(tf.random.stateless_normal((size, dim), [seed, 1]), axis=1)
        self.keys = self.add_weight(shape=(size, dim), initializer=lambda shape, dtype=None: tf.cast(initial, dtype),
                                    trainable=False, name="keys")
        self.pointer = self.add_weight(shape=(), initializer="zeros", dtype="int32",
                                       trainable=False, name="pointer")

    def enqueue(self, keys):
        """Replaces the oldest rows with `keys` (the whole global batch of keys)."""
        rows = keys.shape[0]
        if self.size % rows:
            raise ValueError(f"Queue size {self.size} must be a multiple of the global batch {rows}.")
        start = self.pointer.value
        updated = tf.tensor_scatter_nd_update(
            self.keys.value, tf.range(start, start + rows)[:, None], tf.cast(keys, self.keys.dtype)
        )
        distribute.assign_synced([self.keys, self.pointer], [updated, (start + rows) % self.size])
