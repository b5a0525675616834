"""NPID: instance discrimination with a memory bank.

Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (CVPR).

Every training image is its own class. Instead of a weight vector per class (a
classifier with n outputs would not generalize to new instances), the "class
weights" are the images' own features, remembered in a memory bank V of one
128-d L2-normalized vector per training image:
    P(i | v) = exp(v_i . v / T) / sum_j exp(v_j . v / T),   v = f(x_i),  T = 0.07.

Per step:
  1. v = normalize(Linear_128(encoder(augment(x_i)))) for the batch;
  2. loss = -log P(i | v) over the whole bank (`loss="softmax"`), or its NCE
     approximation against m uniformly drawn bank entries (`loss="nce"`, the paper's
     choice for ImageNet; Z estimated once, from the first batch, then constant);
  3. SGD; then the proximal update of the bank rows of the batch:
     v_i <- normalize(m * v_i + (1 - m) * v),  m = 0.5.

The batch carries each image's dataset index (`data["index"]`, from
`recipes.data.make_dataset(..., with_index=True)`): it is the image's class and its
row in the bank. Under tf.distribute every replica gathers the features and indices
of the whole global batch and writes the same rows, so the banks stay identical.

NCE noise: the paper draws m noise entries per image; we draw one set of m per step,
shared by the batch (one matmul instead of a [B, m, D] gather, same estimator in
expectation), and Z averages the noise terms only (the released code averages all
B x (m + 1), positives too). Noise indices are drawn statelessly per step, equal on every
replica. T = 0.07 is the paper's ImageNet value; the released code's CIFAR script uses 0.1.
"""

import math

import tensorflow as tf

from recipes import distribute
from recipes.augment import NPID, random_view
from recipes.base import Recipe, register
from recipes.heads import mlp
from recipes.losses import instance_nce, instance_softmax, l2_normalize

LOSSES = ("softmax", "nce")


@register("npid")
class NPIDRecipe(Recipe):
    """NPID (instance discrimination with a memory bank).

    Args:
      encoder: backbone to pretrain.
      dataset_size: n, number of training images = rows of the memory bank. The
        batches must carry `index` in [0, n).
      feature_dim: dimension of the bank's vectors (128).
      temperature: T (0.07).
      bank_momentum: m of the proximal bank update (0.5).
      loss: "softmax" (exact, over all n entries) or "nce" (m noise samples).
      num_negatives: m, noise samples per step for "nce" (4096).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policy: augmentation fields to change from NPID's (a dict).
      seed: augmentation, bank-initialization and noise seed.
    """

    needs_index = True

    def __init__(self, encoder, dataset_size=60000, feature_dim=128, temperature=0.07, bank_momentum=0.5,
                 loss="softmax", num_negatives=4096, bn_splits=None, view_policy=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        if loss not in LOSSES:
            raise ValueError(f"Unknown NPID loss {loss!r}. Valid losses: {', '.join(LOSSES)}.")
        self.dataset_size = int(dataset_size)
        self.feature_dim = int(feature_dim)
        self.temperature = float(temperature)
        self.bank_momentum = float(bank_momentum)
        self.loss_type = loss
        self.num_negatives = int(num_negatives)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policy = NPID.updated(view_policy or {})
        # The paper's head: a single linear layer to 128-d, then L2 normalization.
        self.head = mlp(0, self.feature_dim, num_layers=1, name="embedding_head")
        self.head.build((None, encoder.output_shape[-1]))
        initial = l2_normalize(tf.random.stateless_normal((self.dataset_size, self.feature_dim), [self.seed, 7]))
        self.memory_bank = self.add_weight(shape=(self.dataset_size, self.feature_dim), trainable=False,
                                           initializer=lambda shape, dtype=None: tf.cast(initial, dtype),
                                           name="memory_bank")
        # log Z of the NCE estimator; 0 = not estimated yet.
        self.log_normalizer = self.add_weight(shape=(), initializer="zeros", trainable=False, name="log_normalizer")

    @property
    def metrics(self):
        # Listed explicitly: without it Keras does not report the base's loss tracker.
        return [self.loss_tracker]

    def embedding_head(self):
        return self.head

    def get_config(self):
        return {**super().get_config(), "dataset_size": self.dataset_size, "feature_dim": self.feature_dim,
                "temperature": self.temperature, "bank_momentum": self.bank_momentum, "loss": self.loss_type,
                "num_negatives": self.num_negatives, "bn_splits": self.bn_splits,
                "view_policy": self.view_policy.to_config()}

    def _embed(self, views):
        splits = self.bn_splits or self.num_replicas
        return l2_normalize(self.encode_in_groups(
            lambda x, training: self.head(self.encoder(x, training=training), training=training), views, splits))

    def _nce(self, features, index):
        bank = self.memory_bank.value
        positives = tf.reduce_sum(features * tf.gather(bank, index), axis=-1)
        noise_index = tf.random.stateless_uniform([self.num_negatives], self.step_seed(view=77),
                                                  minval=0, maxval=self.dataset_size, dtype=tf.int32)
        noise = tf.matmul(features, tf.gather(bank, noise_index), transpose_b=True)
        # Z ~ n * E_j[exp(v_j . v / T)], estimated on the first batch (over the global
        # batch, so every replica fixes the same constant) and then held fixed.
        local_mean = tf.reduce_mean(tf.exp(tf.stop_gradient(noise) / self.temperature))
        estimate = tf.math.log(distribute.all_gather(local_mean[None])) + math.log(self.dataset_size)
        estimate = tf.reduce_logsumexp(estimate) - math.log(self.num_replicas)
        log_z = tf.where(tf.equal(self.log_normalizer.value, 0.0), estimate, self.log_normalizer.value)
        return instance_nce(positives, noise, self.temperature, log_z, self.dataset_size), log_z

    def loss_terms(self, data):
        images, index = data["image"], self.dataset_index(data)
        global_batch = self.global_batch(images)
        features = self._embed(random_view(images, self.step_seed(1), self.view_policy, global_batch))
        if self.loss_type == "softmax":
            losses, log_z = instance_softmax(features, self.memory_bank.value, index, self.temperature), None
        else:
            losses, log_z = self._nce(features, index)
        state = {"features": distribute.all_gather(tf.stop_gradient(features)),
                 "index": distribute.all_gather(index), "log_z": log_z}
        return tf.reduce_sum(losses) / global_batch, state

    def after_update(self, data, state):
        """Proximal update of the global batch's bank rows, identical on every replica."""
        bank = self.memory_bank.value
        rows = state["index"][:, None]
        mixed = self.bank_momentum * tf.gather(bank, state["index"]) + (1.0 - self.bank_momentum) * state["features"]
        updated = tf.tensor_scatter_nd_update(bank, rows, l2_normalize(mixed))
        variables, values = [self.memory_bank], [updated]
        if state["log_z"] is not None:
            variables.append(self.log_normalizer)
            values.append(state["log_z"])
        distribute.assign_synced(variables, values)
