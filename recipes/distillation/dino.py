"""DINO: self-distillation with no labels.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (ICCV).

A student network learns to match the output distribution of a teacher network over
K "prototype" dimensions, across views: the teacher sees only the 2 global crops
(scale 0.4-1, full resolution), the student sees those and N local crops (scale
0.05-0.4, at a smaller resolution), and every student view predicts every other
view's teacher output ("local-to-global" correspondence, multi-crop). Loss (eq. 1-2):
    sum_{t in global} sum_{s != t} H(P_t, P_s),
    P_s = softmax(g_s / T_s),  P_t = softmax((g_t - c) / T_t).
The teacher is not trained: it is an EMA of the student with momentum rising from
0.996 to 1 on a cosine (as BYOL). Collapse is avoided by the two opposite forces on
the teacher's outputs: *centring* (subtract c, an EMA with rate 0.9 of the mean
teacher output over the global batch) stops one dimension from dominating, and
*sharpening* (T_t = 0.04 warming up linearly to 0.07, below T_s = 0.1) stops the
uniform output that centring alone would favour.

Head: 3-layer MLP (2048, GELU) to a 256-d bottleneck, L2 normalization, and a
weight-normalized linear layer to K prototypes whose norm is frozen at 1 (the code's
`norm_last_layer`; with it off the norms train too, which the authors found better but
less stable, and used for their small ViTs); during the
first `freeze_last_layer_steps` steps (the paper: one epoch) that last layer gets
no update, which the paper found stabilizes the start of training.

Under tf.distribute: augmentation randomness is drawn for the global batch, the
centre is updated with the mean over the global batch (gathered), and encoders
normalize over `bn_splits` fixed groups of each view, so 1 and N replicas compute
the same (the released code runs all crops of one size as one batch, so its BN sees
both global views together: a deliberate difference, for that equality). The local crops run through the same encoder rebuilt on their smaller
input shape (`heads.at_input_shape`: same layers, same weights).

The optimizer is the training CLI's (the paper's is AdamW): its per-parameter gradient
clipping at 3.0 is `--optimizer_args=clipnorm=3.0`; its cosine weight-decay schedule
(0.04 -> 0.4) is not implemented, `--weight_decay` is constant (as in the paper's ResNet
runs). Biases and norm parameters get no weight decay, as in the paper's code.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.augment import DINO_GLOBAL_1, DINO_GLOBAL_2, DINO_LOCAL, local_crop_side, named_view_policies, random_view
from recipes.base import Recipe, copy_as_target, register
from recipes.distillation.byol import cosine_momentum
from recipes.heads import at_input_shape, dino_head
from recipes.losses import dino_loss


def teacher_temperature(step, start: float, end: float, warmup_steps: int):
    """Linear warm-up of the teacher temperature from `start` to `end`, then constant."""
    if warmup_steps <= 0:
        return tf.constant(end, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32) / float(warmup_steps), 1.0)
    return start + (end - start) * progress


@register("dino")
class DINO(Recipe):
    """DINO.

    Args:
      encoder: backbone to pretrain (the student's).
      total_steps: steps of the whole run, for the teacher momentum's cosine
        schedule; None keeps it at `momentum_base`.
      momentum_base: teacher EMA momentum at step 0 (0.996).
      output_dim: K, number of prototypes (65536; a few thousand suit small datasets).
      hidden_dim, bottleneck_dim: head sizes (2048, 256).
      student_temperature: T_s (0.1).
      warmup_teacher_temperature, teacher_temperature: T_t goes from the first to the
        second over `teacher_temperature_warmup_steps` (0.04 -> 0.07 over the paper's first
        30 epochs); None = 30% of `total_steps` (30 of its 100-epoch runs), or no warm-up
        (T_t = `teacher_temperature` throughout) when `total_steps` is unknown.
      center_momentum: EMA rate of the centre (0.9).
      num_local_crops: N local views (8 in the paper's default).
      local_crop_size: side of the local views; None = 96/224 of the image side, at
        least 8 pixels.
      freeze_last_layer_steps: steps during which the prototypes layer is not updated
        (default 0; the paper freezes it for the first epoch: pass that epoch's steps).
      norm_last_layer: keep every prototype at norm 1 (True, the paper's default); False
        trains the norms too.
      head_batch_norm: BN after the head's hidden layers (the paper code's
        `use_bn_in_head`, off for ViTs); see `heads.dino_head` for why a ResNet may want it.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policies: {"global_1"|"global_2"|"local": fields to change in that view}.
      seed: augmentation seed.
    """

    needs_total_steps = True
    decay_vectors = False  # the paper's code regularizes neither biases nor norm parameters

    def __init__(self, encoder, total_steps=None, momentum_base=0.996, output_dim=65536, hidden_dim=2048,
                 bottleneck_dim=256, student_temperature=0.1, warmup_teacher_temperature=0.04,
                 teacher_temperature=0.07, teacher_temperature_warmup_steps=None, center_momentum=0.9,
                 num_local_crops=8, local_crop_size=None, freeze_last_layer_steps=0, norm_last_layer=True,
                 head_batch_norm=False, bn_splits=None, view_policies=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.momentum_base = float(momentum_base)
        self.output_dim = int(output_dim)
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.student_temperature = float(student_temperature)
        self.warmup_teacher_temperature = float(warmup_teacher_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.teacher_temperature_warmup_steps = (None if teacher_temperature_warmup_steps is None
                                                 else int(teacher_temperature_warmup_steps))
        self.center_momentum = float(center_momentum)
        self.num_local_crops = int(num_local_crops)
        channels = encoder.input_shape[-1]
        self.local_crop_size = local_crop_side(encoder.input_shape[1:], local_crop_size)
        self.freeze_last_layer_steps = int(freeze_last_layer_steps)
        self.norm_last_layer = bool(norm_last_layer)
        self.head_batch_norm = bool(head_batch_norm)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policies = named_view_policies(
            {"global_1": DINO_GLOBAL_1, "global_2": DINO_GLOBAL_2, "local": DINO_LOCAL}, view_policies, "DINO")

        self.head = dino_head(self.output_dim, self.hidden_dim, self.bottleneck_dim,
                              norm_last_layer=self.norm_last_layer, batch_norm=self.head_batch_norm,
                              name="student_head")
        self.head.build((None, encoder.output_shape[-1]))
        self.local_encoder = at_input_shape(encoder, (self.local_crop_size, self.local_crop_size, channels))
        self.teacher_encoder = copy_as_target(encoder)
        self.teacher_head = copy_as_target(self.head)
        self.center = self.add_weight(shape=(self.output_dim,), initializer="zeros", trainable=False,
                                      name="center")
        self.temperature_tracker = keras.metrics.Mean(name="teacher_temperature")

    @property
    def warmup_steps(self) -> int:
        """Steps of the teacher-temperature warm-up (`teacher_temperature_warmup_steps` resolved)."""
        if self.teacher_temperature_warmup_steps is not None:
            return self.teacher_temperature_warmup_steps
        return int(0.3 * self.total_steps) if self.total_steps else 0

    def get_config(self):
        return {**super().get_config(), "total_steps": self.total_steps, "momentum_base": self.momentum_base,
                "output_dim": self.output_dim, "hidden_dim": self.hidden_dim,
                "bottleneck_dim": self.bottleneck_dim, "student_temperature": self.student_temperature,
                "warmup_teacher_temperature": self.warmup_teacher_temperature,
                "teacher_temperature": self.teacher_temperature,
                "teacher_temperature_warmup_steps": self.teacher_temperature_warmup_steps,
                "center_momentum": self.center_momentum, "num_local_crops": self.num_local_crops,
                "local_crop_size": self.local_crop_size, "freeze_last_layer_steps": self.freeze_last_layer_steps,
                "norm_last_layer": self.norm_last_layer, "head_batch_norm": self.head_batch_norm,
                "bn_splits": self.bn_splits,
                "view_policies": {k: v.to_config() for k, v in self.view_policies.items()}}

    @property
    def metrics(self):
        return [self.loss_tracker, self.temperature_tracker]

    def embedding_head(self):
        """The head up to its L2-normalized bottleneck: the prototypes are a classifier, not an embedding."""
        return keras.Sequential(self.head.layers[:-1], name="dino_embedding")

    def target_models(self):
        return [self.teacher_encoder, self.teacher_head]

    def _outputs(self, encoder, head, views):
        return self.encode_in_groups(lambda x, training: head(encoder(x, training=True), training=True),
                                     views, self.bn_splits or self.num_replicas)

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        global_views = [random_view(images, self.step_seed(1), self.view_policies["global_1"], global_batch),
                        random_view(images, self.step_seed(2), self.view_policies["global_2"], global_batch)]
        local_size = (self.local_crop_size, self.local_crop_size)
        local_views = [random_view(images, self.step_seed(3 + i), self.view_policies["local"], global_batch,
                                   output_size=local_size) for i in range(self.num_local_crops)]
        student = ([self._outputs(self.encoder, self.head, v) for v in global_views]
                   + [self._outputs(self.local_encoder, self.head, v) for v in local_views])
        teacher = [tf.stop_gradient(self._outputs(self.teacher_encoder, self.teacher_head, v))
                   for v in global_views]
        temperature = teacher_temperature(self.optimizer.iterations, self.warmup_teacher_temperature,
                                          self.teacher_temperature, self.warmup_steps)
        self.temperature_tracker.update_state(temperature)
        losses = dino_loss(student, teacher, self.center.value, self.student_temperature, temperature)
        batch_center = tf.reduce_mean(tf.cast(distribute.all_gather(tf.concat(teacher, axis=0)), self.center.dtype), axis=0)
        return tf.reduce_sum(losses) / global_batch, {"batch_center": batch_center}

    def loss_and_gradients(self, data):
        loss, gradients, state = super().loss_and_gradients(data)
        return loss, self.frozen_until(gradients, self.head.layers[-1], self.freeze_last_layer_steps), state

    def after_update(self, data, state):
        tau = cosine_momentum(self.optimizer.iterations - 1, self.momentum_base, self.total_steps)
        self.momentum_update([(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)], tau)
        center = self.center_momentum * self.center.value + (1.0 - self.center_momentum) * state["batch_center"]
        distribute.assign_synced([self.center], [center])
