"""BYOL: Bootstrap Your Own Latent.

Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning" (NeurIPS).

No negatives. An *online* network (encoder, projector, predictor) learns to predict
the projection that a *target* network (encoder, projector) gives of another view of
the same image. The target is not trained by gradients: it is an exponential moving
average of the online weights, xi <- tau * xi + (1 - tau) * theta, with tau rising
from tau_base = 0.996 to 1 on a cosine over training (sec. 3.2):
    tau_k = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2.
Collapse is avoided by the predictor plus the stop-gradient on the target.

Per step: the loss is the normalized MSE 2 - 2 cos(q_theta(z_1), z'_2) symmetrized by
swapping the views (eq. 2-3); the optimizer step on the online network (the paper's
is LARS, lr 0.2 x B/256, wd 1.5e-6, biases and BN excluded; `recipes.train` defaults to
SGD, `--optimizer=lars` gives LARS); then the EMA update.
The two views use BYOL's asymmetric augmentation (table 6): Gaussian blur with p=1.0
for view 1 and 0.1 for view 2, solarization with p=0.0 and 0.2. Blur is skipped on
images under 33 px (`recipes.augment`), where only the solarization asymmetry is left.
The released code's tau_base depends on the run length (0.97 for 40 epochs, 0.99 for
100-300, 0.996 for 1000); our default is the 1000-epoch value.

BatchNorm: BYOL's MLPs have BN; as in SimCLR here, encoder and heads normalize over
`bn_splits` fixed groups of the global batch, so 1 and N replicas compute the same.
"""

import math

import keras
import tensorflow as tf

from recipes.augment import BYOL_VIEW_1, BYOL_VIEW_2, random_view, updated_policies
from recipes.base import Recipe, copy_as_target, register
from recipes.heads import mlp
from recipes.losses import byol_loss


def cosine_momentum(step, base: float, total_steps):
    """BYOL's tau_k: base at step 0, rising to 1 at `total_steps` on a half cosine.

    `total_steps=None` keeps tau at `base` (a schedule needs the training length).
    """
    if not total_steps:
        return tf.constant(base, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32) / float(total_steps), 1.0)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


@register("byol")
class BYOL(Recipe):
    """BYOL.

    Args:
      encoder: backbone to pretrain (the online encoder).
      total_steps: K, steps of the whole training run (epochs * steps per epoch): the
        length of the cosine momentum schedule. None keeps tau at `momentum_base`.
      momentum_base: tau_base (0.996; 0.99 is common for short CIFAR runs).
      projection_dim, hidden_dim: projector and predictor sizes (256, 4096).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policies: two dicts, fields to change in each view's augmentation
        (from BYOL's asymmetric pair).
      seed: augmentation seed.
    """

    needs_total_steps = True
    decay_vectors = False  # the paper: no weight decay (nor LARS adaptation) on biases and BN

    def __init__(self, encoder, total_steps=None, momentum_base=0.996, projection_dim=256, hidden_dim=4096,
                 bn_splits=None, view_policies=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.momentum_base = float(momentum_base)
        self.projection_dim = int(projection_dim)
        self.hidden_dim = int(hidden_dim)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policies = updated_policies([BYOL_VIEW_1, BYOL_VIEW_2], view_policies)
        feature_dim = encoder.output_shape[-1]
        self.projector = mlp(self.hidden_dim, self.projection_dim, batch_norm=True, name="projector")
        self.predictor = mlp(self.hidden_dim, self.projection_dim, batch_norm=True, name="predictor")
        self.projector.build((None, feature_dim))
        self.predictor.build((None, self.projection_dim))
        self.target_encoder = copy_as_target(encoder)
        self.target_projector = copy_as_target(self.projector)
        self.momentum_tracker = keras.metrics.Mean(name="tau")

    def get_config(self):
        return {**super().get_config(), "total_steps": self.total_steps, "momentum_base": self.momentum_base,
                "projection_dim": self.projection_dim, "hidden_dim": self.hidden_dim,
                "bn_splits": self.bn_splits, "view_policies": [p.to_config() for p in self.view_policies]}

    @property
    def metrics(self):
        return [self.loss_tracker, self.momentum_tracker]

    def embedding_head(self):
        return self.projector

    def target_models(self):
        return [self.target_encoder, self.target_projector]

    def _in_groups(self, fn, views):
        return self.encode_in_groups(lambda x, training: fn(x), views, self.bn_splits or self.num_replicas)

    def _online(self, views):
        return self._in_groups(
            lambda x: self.predictor(self.projector(self.encoder(x, training=True), training=True), training=True),
            views)

    def _target(self, views):
        # Batch statistics, like the online network (see `copy_as_target`).
        return tf.stop_gradient(self._in_groups(
            lambda x: self.target_projector(self.target_encoder(x, training=True), training=True), views))

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        views = [random_view(images, self.step_seed(i + 1), policy, global_batch)
                 for i, policy in enumerate(self.view_policies)]
        online = [self._online(v) for v in views]
        target = [self._target(v) for v in views]
        losses = byol_loss(online[0], target[1]) + byol_loss(online[1], target[0])
        return tf.reduce_sum(losses) / global_batch, {}

    def after_update(self, data, state):
        # iterations was incremented by the update just applied: step k = iterations - 1.
        tau = cosine_momentum(self.optimizer.iterations - 1, self.momentum_base, self.total_steps)
        self.momentum_update([(self.encoder, self.target_encoder), (self.projector, self.target_projector)], tau)
        self.momentum_tracker.update_state(tau)
