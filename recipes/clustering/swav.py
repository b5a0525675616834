"""SwAV: clustering by swapped assignments between views, with Sinkhorn-Knopp self-labelling.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments" (NeurIPS).

Each view's L2-normalized embedding z is scored against K learnable prototypes c_k
(also kept at unit norm). The two global crops get *codes* q: soft assignments of the
batch to the prototypes computed by a few Sinkhorn-Knopp iterations
(`recipes.losses.sinkhorn_knopp`), which force every prototype to take an equal share
of the batch. That equipartition is what stops the trivial solution of one cluster
for everything, the self-labelling of Asano et al. 2020 done online, per batch. Then
every view predicts the code of each other view ("swapped prediction",
`recipes.losses.swav_loss`): cross-entropy between q and softmax(z . C / T).

Multi-crop: 2 global crops (scale 0.14-1) and `num_local_crops` small ones (scale
0.05-0.14 at 96/224 of the side); only the global crops get codes. Codes take no
gradient. The prototypes are re-normalized before every step and frozen for the first
`freeze_prototypes_steps` steps (default 0: set it; the released scripts freeze them for
about one epoch, 5005 steps at batch 256 and 313 at 4096; `benchmarks/fmnist_settings.py`
sets one epoch). Frozen here means a zeroed gradient; the released code drops the gradient
instead, so its optimizer applies no weight decay or momentum to them meanwhile.

Queue: a small batch is few samples to share out over K prototypes (the code's README: the
queue helps most with small batches), so the embeddings of the global crops of recent
batches are kept (`queue_size`; 3840 rows in the released batch-256 scripts, none at 4096)
and enter the Sinkhorn iterations beside the batch (their codes are dropped); it is used
once `queue_size` rows have been enqueued since `queue_start_step` (the scripts: epoch 15).
The queue is global: every replica holds the same rows, counted once in the Sinkhorn sums,
while the batch's sums are all-reduced, so 1 and N replicas compute the same codes.

BatchNorm, a deliberate difference: each crop is encoded in its own pass, so BN sees one
view at a time (per `bn_splits` group), where the released code runs all same-size crops
through the backbone together with synchronized BN; concatenated views would put different
rows in each BN group on 1 and on N replicas unless interleaved image-major.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.augment import SWAV_GLOBAL, SWAV_LOCAL, local_crop_side, named_view_policies, random_view
from recipes.base import FeatureQueue, Recipe, register
from recipes.heads import at_input_shape, mlp
from recipes.losses import l2_normalize, sinkhorn_knopp, swav_loss

NUM_GLOBAL_CROPS = 2


@register("swav")
class SwAV(Recipe):
    """SwAV with multi-crop and the optional queue.

    Args:
      encoder: backbone to pretrain.
      num_prototypes: K (3000 in the paper).
      hidden_dim, projection_dim: projection head sizes (2048 -> 128, BN in the hidden layer).
      temperature: T of the softmax over prototypes (0.1).
      epsilon: Sinkhorn's entropic regularization (0.05).
      sinkhorn_iterations: 3.
      num_local_crops: small crops per image (6 in the paper's 2x224 + 6x96).
      local_crop_size: their side; None = 96/224 of the image side, at least 8 pixels.
      freeze_prototypes_steps: steps during which the prototypes get a zero gradient (default 0).
      queue_size: embeddings kept per global crop (0 = no queue); a multiple of the global batch.
      queue_start_step: step from which the queue fills.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policies: {"global"|"local": fields to change in that view}.
      seed: augmentation seed.
    """

    def __init__(self, encoder, num_prototypes=3000, hidden_dim=2048, projection_dim=128, temperature=0.1,
                 epsilon=0.05, sinkhorn_iterations=3, num_local_crops=6, local_crop_size=None,
                 freeze_prototypes_steps=0, queue_size=0, queue_start_step=0, bn_splits=None, view_policies=None,
                 seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.num_prototypes = int(num_prototypes)
        self.hidden_dim = int(hidden_dim)
        self.projection_dim = int(projection_dim)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.num_local_crops = int(num_local_crops)
        channels = encoder.input_shape[-1]
        self.local_crop_size = local_crop_side(encoder.input_shape[1:], local_crop_size)
        self.freeze_prototypes_steps = int(freeze_prototypes_steps)
        self.queue_size = int(queue_size)
        self.queue_start_step = int(queue_start_step)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policies = named_view_policies({"global": SWAV_GLOBAL, "local": SWAV_LOCAL}, view_policies, "SwAV")

        self.head = mlp(self.hidden_dim, self.projection_dim, batch_norm=True, name="projection_head")
        self.head.build((None, encoder.output_shape[-1]))
        self.prototypes = keras.layers.Dense(self.num_prototypes, use_bias=False, name="prototypes")
        self.prototypes.build((None, self.projection_dim))
        self.local_encoder = at_input_shape(encoder, (self.local_crop_size, self.local_crop_size, channels))
        self.queues = [FeatureQueue(self.queue_size, self.projection_dim, seed=seed + i, name=f"queue_{i}")
                       for i in range(NUM_GLOBAL_CROPS)] if self.queue_size else []

    def get_config(self):
        return {**super().get_config(), "num_prototypes": self.num_prototypes, "hidden_dim": self.hidden_dim,
                "projection_dim": self.projection_dim, "temperature": self.temperature, "epsilon": self.epsilon,
                "sinkhorn_iterations": self.sinkhorn_iterations, "num_local_crops": self.num_local_crops,
                "local_crop_size": self.local_crop_size, "freeze_prototypes_steps": self.freeze_prototypes_steps,
                "queue_size": self.queue_size, "queue_start_step": self.queue_start_step, "bn_splits": self.bn_splits,
                "view_policies": {k: v.to_config() for k, v in self.view_policies.items()}}

    def embedding_head(self):
        """The projection the prototypes score, L2-normalized."""
        unit = keras.layers.UnitNormalization(name="unit", dtype="float32")  # float16 overflows the squared norm
        return keras.Sequential([*self.head.layers, unit], name="swav_embedding")

    def _embed(self, encoder, views):
        return l2_normalize(self.encode_in_groups(
            lambda x, training: self.head(encoder(x, training=training), training=training),
            views, self.bn_splits or self.num_replicas))

    def _queue_in_use(self, global_batch):
        """The queue enters Sinkhorn once full of rows enqueued since `queue_start_step`."""
        filled = tf.cast(self.optimizer.iterations - self.queue_start_step, tf.int64) * global_batch
        return filled >= self.queue_size

    def before_update(self, data):
        """Prototypes back to unit norm before every step, as the paper's code does."""
        kernel = self.prototypes.kernel
        distribute.assign_synced([kernel], [l2_normalize(kernel.value, axis=0)])

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        global_views = [random_view(images, self.step_seed(1 + i), self.view_policies["global"], global_batch)
                        for i in range(NUM_GLOBAL_CROPS)]
        local_size = (self.local_crop_size, self.local_crop_size)
        local_views = [random_view(images, self.step_seed(3 + i), self.view_policies["local"], global_batch,
                                   output_size=local_size) for i in range(self.num_local_crops)]
        embeddings = ([self._embed(self.encoder, v) for v in global_views]
                      + [self._embed(self.local_encoder, v) for v in local_views])
        scores = [self.prototypes(z) for z in embeddings]
        codes = []
        for i in range(NUM_GLOBAL_CROPS):
            shared = None
            if self.queues:
                queued = self.prototypes(tf.cast(self.queues[i].keys.value, scores[i].dtype))
                shared = tf.cond(self._queue_in_use(global_batch), lambda: queued, lambda: queued[:0])
            codes.append(sinkhorn_knopp(scores[i], self.epsilon, self.sinkhorn_iterations, shared,
                                        distribute.all_reduce_sum))
        losses = swav_loss(scores, codes, self.temperature)
        state = {f"queued_{i}": tf.stop_gradient(distribute.all_gather(embeddings[i]))
                 for i in range(NUM_GLOBAL_CROPS)} if self.queues else {}
        return tf.reduce_sum(losses) / global_batch, state

    def loss_and_gradients(self, data):
        loss, gradients, state = super().loss_and_gradients(data)
        return loss, self.frozen_until(gradients, self.prototypes, self.freeze_prototypes_steps), state

    def after_update(self, data, state):
        """Enqueues this step's global-crop embeddings (the rows a full queue holds are the
        latest `queue_size`, whichever step filling began, as in the paper)."""
        for i, queue in enumerate(self.queues):
            queue.enqueue(state[f"queued_{i}"])
