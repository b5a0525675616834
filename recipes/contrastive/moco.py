"""MoCo v2: Momentum Contrast with an MLP head and stronger augmentation.

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"
(CVPR); Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning".

Instance discrimination as dictionary look-up: a query (one view of an image) must
pick out its key (another view, encoded by a slowly moving *momentum* encoder) among
K keys of earlier batches kept in a queue. The momentum encoder keeps the queued keys
consistent; the queue makes K large without a large batch.

Per step (Algorithm 1 of the paper):
  1. key encoder <- m * key encoder + (1 - m) * query encoder;
  2. q = normalize(head_q(f_q(view 1))), k = normalize(head_k(f_k(view 2))) with
     keys computed under shuffled BatchNorm groups;
  3. loss = InfoNCE(q, k+, queue) at temperature T;
  4. SGD on the query encoder and head; enqueue the keys of the whole global batch.

Shuffle BN: the paper shuffles keys across GPUs so a key's BN statistics come from
other images than its query's, or the model can "cheat" by recognising its own
sub-batch. Here both encoders normalize over `bn_splits` fixed groups of the global
batch and keys are permuted across groups (a global permutation, gathered over
replicas) before the key encoder and restored after. That is the per-GPU scheme
exactly when the groups are the replicas, works on one device too, and computes the
same numbers on 1 or N replicas. We chose it over SyncBN because SyncBN still lets a
query and its positive key share statistics of the same batch while queued
negatives do not: the leak shuffle BN exists to remove.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.augment import ViewPolicy, random_view
from recipes.base import FeatureQueue, Recipe, copy_as_target, register
from recipes.heads import mlp
from recipes.losses import contrastive_accuracy, info_nce, l2_normalize


@register("moco")
class MoCo(Recipe):
    """MoCo v2.

    Args:
      encoder: backbone to pretrain.
      queue_size: K, number of negative keys (65536 on ImageNet; 4096 suits
        datasets of ~50k images, where a longer queue would hold stale keys of the
        same images).
      momentum: m of the key encoder EMA (0.999 in the paper; 0.99 is the usual
        choice for short CIFAR-scale schedules).
      temperature: T of InfoNCE (0.2 in MoCo v2).
      projection_dim, hidden_dim: MLP head sizes (128, and 2048: the released code sets the
        hidden width to the encoder's feature width, 2048 for ResNet-50; pass yours).
      bn_splits: number of BatchNorm groups over the global batch (shuffle BN). The paper's
        is one per GPU, 8 groups of 32 at batch 256; 2 (the default) lets any even batch
        run, but a key's group then shares half its images with its query's, and on
        Fashion-MNIST 8 groups gave 1 point more kNN at the same cost (benchmarks/RESULTS.md).
      symmetric: also swap the two views and average both losses (MoCo v3 style;
        the paper's v2 is asymmetric).
      view_policy: augmentation fields to change from MoCo v2's (a dict).
      seed: augmentation / queue seed.
    """

    def __init__(self, encoder, queue_size=4096, momentum=0.999, temperature=0.2,
                 projection_dim=128, hidden_dim=2048, bn_splits=2, symmetric=False,
                 view_policy=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.queue_size = int(queue_size)
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.projection_dim = int(projection_dim)
        self.hidden_dim = int(hidden_dim)
        self.bn_splits = int(bn_splits)
        self.symmetric = bool(symmetric)
        self.view_policy = ViewPolicy.from_config(view_policy or {})

        self.head = mlp(self.hidden_dim, self.projection_dim, name="query_head")
        self.head.build((None, encoder.output_shape[-1]))
        self.key_encoder = copy_as_target(encoder)
        self.key_head = copy_as_target(self.head)
        self.queue = FeatureQueue(self.queue_size, self.projection_dim, seed=seed, name="queue")
        self.accuracy_tracker = keras.metrics.Mean(name="contrastive_acc")

    def get_config(self):
        return {**super().get_config(), "queue_size": self.queue_size, "momentum": self.momentum,
                "temperature": self.temperature, "projection_dim": self.projection_dim,
                "hidden_dim": self.hidden_dim, "bn_splits": self.bn_splits,
                "symmetric": self.symmetric, "view_policy": self.view_policy.to_config()}

    def embedding_head(self):
        return self.head

    def target_models(self):
        return [self.key_encoder, self.key_head]

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _queries(self, views):
        features = self.encode_in_groups(self.encoder, views, self.bn_splits)
        return l2_normalize(self.head(features, training=True))

    def _keys(self, views):
        """Keys of the *global* batch in batch order, computed under shuffled BN groups."""
        global_views = distribute.all_gather(views)
        global_batch = self.global_batch(views)
        order = tf.argsort(tf.random.stateless_uniform([global_batch], self.step_seed(view=99)))
        shuffled = distribute.replica_slice(tf.gather(global_views, order), views.shape[0])
        keys = self.encode_in_groups(self.key_encoder, shuffled, self.bn_splits)
        keys = l2_normalize(self.key_head(keys, training=True))
        keys = distribute.all_gather(keys)
        return tf.stop_gradient(tf.scatter_nd(order[:, None], keys, tf.shape(keys)))

    def before_update(self, data):
        self.momentum_update([(self.encoder, self.key_encoder), (self.head, self.key_head)], self.momentum)

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        view_1 = random_view(images, self.step_seed(1), self.view_policy, global_batch)
        view_2 = random_view(images, self.step_seed(2), self.view_policy, global_batch)
        negatives = self.queue.keys.value
        pairs = [(view_1, view_2), (view_2, view_1)] if self.symmetric else [(view_1, view_2)]
        losses, global_keys = [], []
        for query_view, key_view in pairs:
            queries = self._queries(query_view)
            keys_all = self._keys(key_view)
            keys = distribute.replica_slice(keys_all, images.shape[0])
            losses.append(info_nce(queries, keys, negatives, self.temperature))
            global_keys.append(keys_all)
            self.accuracy_tracker.update_state(contrastive_accuracy(queries, keys, negatives))
        loss = tf.add_n([tf.reduce_sum(l) for l in losses]) / (len(pairs) * global_batch)
        return loss, {"keys": global_keys}

    def after_update(self, data, state):
        for keys in state["keys"]:
            self.queue.enqueue(keys)
