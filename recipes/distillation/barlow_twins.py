"""Barlow Twins: self-supervised learning via redundancy reduction.

Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction" (ICML).

Two views go through the same encoder and projector. The embeddings are normalized
per dimension over the batch, and their cross-correlation matrix C (D x D) is driven
toward the identity: diagonal 1 makes each feature invariant to the augmentation,
off-diagonal 0 makes features carry non-redundant information (H. Barlow's
redundancy-reduction principle). No negatives, no momentum encoder, no predictor;
collapse is impossible because a constant embedding cannot have unit correlation.
    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2,   lambda = 5.1e-3.

Global batch: C is a statistic of the whole batch, so under tf.distribute every
replica gathers the embeddings of all replicas (`distribute.all_gather`, with the
gradient summed back to the owner) and computes the same global C and loss. Each
replica returns loss / num_replicas: the optimizer sums the replicas' gradients,
and the gather's backward pass sums what each replica's copy of the loss sends to
every row, which together give exactly the single-device gradient.

Projector: three linear layers of 8192 units, BN + ReLU after the first two (sec.
3); augmentations: BYOL's asymmetric pair (the paper follows BYOL), whose blur is
skipped on images under 33 px (`recipes.augment`). The released code sums C over GPUs
with an all-reduce that autograd does not see, so its gradients are 1/world-size of the
exact ones its learning rates were tuned with; ours are exact.
"""


from recipes import distribute
from recipes.augment import BYOL_VIEW_1, BYOL_VIEW_2, random_view, updated_policies
from recipes.base import Recipe, register
from recipes.heads import mlp
from recipes.losses import barlow_twins_loss


@register("barlow_twins")
class BarlowTwins(Recipe):
    """Barlow Twins.

    Args:
      encoder: backbone to pretrain.
      lambda_offdiag: weight of the redundancy-reduction term (5.1e-3 in the paper,
        tuned for an 8192-d projector; scale ~1/D for smaller ones).
      projection_dim, hidden_dim: projector sizes (8192, 8192).
      bn_splits: BatchNorm groups over the global batch for the encoder and
        projector; None = one per replica. (The embedding normalization inside the
        loss is always over the global batch.)
      view_policies: two dicts, fields to change in each view's augmentation (BYOL's).
      seed: augmentation seed.
    """

    def __init__(self, encoder, lambda_offdiag=5.1e-3, projection_dim=8192, hidden_dim=8192, bn_splits=None,
                 view_policies=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.lambda_offdiag = float(lambda_offdiag)
        self.projection_dim = int(projection_dim)
        self.hidden_dim = int(hidden_dim)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policies = updated_policies([BYOL_VIEW_1, BYOL_VIEW_2], view_policies)
        self.projector = mlp(self.hidden_dim, self.projection_dim, num_layers=3, batch_norm=True, name="projector")
        self.projector.build((None, encoder.output_shape[-1]))

    @property
    def metrics(self):
        # Listed explicitly: without it Keras does not report the base's loss tracker.
        return [self.loss_tracker]

    def embedding_head(self):
        return self.projector

    def get_config(self):
        return {**super().get_config(), "lambda_offdiag": self.lambda_offdiag,
                "projection_dim": self.projection_dim, "hidden_dim": self.hidden_dim, "bn_splits": self.bn_splits,
                "view_policies": [p.to_config() for p in self.view_policies]}

    def _embed(self, views):
        return self.encode_in_groups(
            lambda x, training: self.projector(self.encoder(x, training=training), training=training),
            views, self.bn_splits or self.num_replicas)

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        z_1, z_2 = [distribute.all_gather(self._embed(random_view(images, self.step_seed(i + 1), policy,
                                                                     global_batch)))
                    for i, policy in enumerate(self.view_policies)]
        return barlow_twins_loss(z_1, z_2, self.lambda_offdiag) / self.num_replicas, {}
