"""SimCLR: a simple framework for contrastive learning of visual representations.

Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning
of Visual Representations" (ICML).

Two random views of every image go through the same encoder and a nonlinear
projection head (BN in the MLP); NT-Xent pulls the two projections of an image
together and pushes them away from the 2N - 2 projections of the other images in the
batch. There is no queue or momentum encoder: the negatives are the batch, so the
batch must be large, and under tf.distribute it is the *global* batch. Each replica
gathers the projections of all replicas (`distribute.all_gather`, whose backward
pass returns every replica the gradient its rows received anywhere) and contrasts its
own anchors with all of them, exactly the single-device computation.

BatchNorm: SimCLR uses global BN over both views together (its code encodes the two
views as one batch of 2N). Our encoder's BN layers are per-replica, so the encoder and
head normalize each view over `bn_splits` fixed groups of the global batch
(`Recipe.encode_in_groups`): one group (= global BN of that view) on a single device;
set `bn_splits` to a multiple of the replica count for results that do not depend on
it. Per view rather than both views at once, so that 1 and N replicas put the same rows
in each group.

Loss scale: the mean over the 2N anchors, the paper's 1/(2N) sum (eq. 1 and
algorithm 1). The released TF2 code returns the sum of the two directions' means,
twice this: at the same learning rate its SGD steps are twice ours.

Colour distortion: strength 1 (the ImageNet setting) by default; the released code's
CIFAR-10 run uses 0.5 and no blur (`view_policy` changes it; blur is skipped on
images under 33 px anyway, `recipes.augment`).
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.augment import SIMCLR, random_view
from recipes.base import Recipe, register
from recipes.heads import mlp
from recipes.losses import l2_normalize, nt_xent


def nearest_view_hits(z_1, all_z_2, offset=0):
    """Health signal, 1.0 where a view-1 projection's nearest view 2 (by cosine, the loss's
    similarity) among the global batch is its own image's, else 0.0; [b]."""
    similarity = tf.matmul(l2_normalize(z_1), l2_normalize(all_z_2), transpose_b=True)
    nearest = tf.argmax(similarity, axis=1, output_type=tf.int32)
    return tf.cast(tf.equal(nearest, tf.range(tf.shape(z_1)[0]) + offset), tf.float32)


@register("simclr")
class SimCLR(Recipe):
    """SimCLR (v1).

    Args:
      encoder: backbone to pretrain.
      temperature: T of NT-Xent (0.5 on CIFAR-size batches, 0.1 for ImageNet at 4096).
      projection_dim, hidden_dim: projection head g(.) sizes (128, 2048 in the paper).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policy: augmentation fields to change from SimCLR's (strength 1; a dict).
      seed: augmentation seed.
    """

    def __init__(self, encoder, temperature=0.5, projection_dim=128, hidden_dim=2048, bn_splits=None,
                 view_policy=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.temperature = float(temperature)
        self.projection_dim = int(projection_dim)
        self.hidden_dim = int(hidden_dim)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policy = SIMCLR.updated(view_policy or {})
        self.head = mlp(self.hidden_dim, self.projection_dim, batch_norm=True, last_batch_norm=True,
                        name="projection_head")
        self.head.build((None, encoder.output_shape[-1]))
        self.accuracy_tracker = keras.metrics.Mean(name="contrastive_acc")

    def embedding_head(self):
        return self.head

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "projection_dim": self.projection_dim,
                "hidden_dim": self.hidden_dim, "bn_splits": self.bn_splits,
                "view_policy": self.view_policy.to_config()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _project(self, views):
        splits = self.bn_splits or self.num_replicas
        return self.encode_in_groups(lambda x, training: self.head(self.encoder(x, training=training),
                                                                   training=training), views, splits)

    def loss_terms(self, data):
        images = data["image"]
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        z_1 = self._project(random_view(images, self.step_seed(1), self.view_policy, global_batch))
        z_2 = self._project(random_view(images, self.step_seed(2), self.view_policy, global_batch))
        all_z_1, all_z_2 = distribute.all_gather(z_1), distribute.all_gather(z_2)
        offset = tf.cast(distribute.replica_id(), tf.int32) * local_batch
        losses = nt_xent(z_1, z_2, self.temperature, all_z_1, all_z_2, offset)
        self.accuracy_tracker.update_state(nearest_view_hits(z_1, all_z_2, offset))
        return tf.reduce_sum(losses) / (2 * global_batch), {}
