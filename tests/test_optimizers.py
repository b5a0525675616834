"""SGDL2 (SGD whose weight decay is an L2 term in the gradient, the papers' SGD) and LARS."""
import keras
import numpy as np
import pytest

from recipes.optimizers import LARS, SGDL2
from tests.distributed_utils import two_replica_strategy


def numpy_sgd_l2(weights, targets, decayed, lr, momentum, nesterov, l2, steps):
    """Reference in torch.optim.SGD's form: g = grad + l2*w; buf = m*buf + g; w -= lr*(g + m*buf | buf)."""
    weights = [w.astype(np.float64).copy() for w in weights]
    buffers = [np.zeros_like(w) for w in weights]
    for _ in range(steps):
        for i, (w, t) in enumerate(zip(weights, targets)):
            g = (w - t) + (l2 * w if decayed[i] else 0.0)  # loss 0.5 * |w - t|^2
            buffers[i] = momentum * buffers[i] + g
            weights[i] = w - lr * (g + momentum * buffers[i] if nesterov else buffers[i])
    return weights


def run_keras(optimizer, weights, targets, names, steps, loss_scale=1.0):
    variables = [keras.Variable(w, name=n) for w, n in zip(weights, names)]
    for _ in range(steps):
        grads = [loss_scale * (v.value - t) for v, t in zip(variables, targets)]
        optimizer.apply_gradients(zip(grads, variables))
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("kernels_only", [False, True])
def test_sgd_l2_matches_the_coupled_reference(nesterov, kernels_only):
    rng = np.random.default_rng(0)
    names = ["kernel", "bias", "gamma"]
    weights = [rng.normal(size=s).astype(np.float32) for s in ((3, 4), (4,), (4,))]
    targets = [rng.normal(size=w.shape).astype(np.float32) for w in weights]
    optimizer = SGDL2(0.1, momentum=0.9, nesterov=nesterov, l2=0.05, l2_kernels_only=kernels_only)
    got = run_keras(optimizer, weights, targets, names, steps=12)
    decayed = [True, not kernels_only, not kernels_only]
    want = numpy_sgd_l2(weights, targets, decayed, 0.1, 0.9, nesterov, 0.05, steps=12)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # The penalty matters at these settings: without it the result differs.
    plain = numpy_sgd_l2(weights, targets, [False] * 3, 0.1, 0.9, nesterov, 0.0, steps=12)
    assert np.abs(got[0] - plain[0]).max() > 1e-2


def test_l2_through_momentum_pulls_ten_times_harder_than_keras_decoupled_decay():
    """At m=0.9 the same coefficient shrinks weights ~1/(1-m) = 10x faster per step than Keras's."""
    w0, steps, lr, wd = np.ones((5,), np.float32), 300, 0.05, 1e-3

    def shrink(optimizer):
        variable = keras.Variable(w0, name="kernel")
        for _ in range(steps):
            optimizer.apply_gradients([(keras.ops.zeros_like(variable), variable)])
        return -np.log(variable.numpy()[0])  # total log-shrink

    coupled = shrink(SGDL2(lr, momentum=0.9, l2=wd))
    decoupled = shrink(keras.optimizers.SGD(lr, momentum=0.9, weight_decay=wd))
    np.testing.assert_allclose(decoupled, steps * lr * wd, rtol=1e-2)
    assert 8.0 < coupled / decoupled < 10.0


def test_sgd_l2_config_round_trip_and_refuses_decoupled_decay_on_top():
    optimizer = SGDL2(0.03, momentum=0.9, nesterov=True, l2=5e-4, l2_kernels_only=True)
    clone = SGDL2.from_config(optimizer.get_config())
    assert (clone.l2, clone.l2_kernels_only, clone.nesterov) == (5e-4, True, True)
    with pytest.raises(ValueError, match="coupled"):
        SGDL2(0.03, l2=5e-4, weight_decay=5e-4)
    with pytest.raises(ValueError, match="l2 must be"):
        SGDL2(0.03, l2=-1.0)


def test_kernels_only_decays_dense_and_conv_kernels_in_a_fitted_model_not_biases_or_batchnorm():
    """Through model.fit (where the TF backend passes tf.Variables named "<layer>/kernel:0")."""
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Flatten(),
                              keras.layers.Dense(3, name="dense")])
    for layer in model.layers:  # non-zero biases and BN offsets, so a decay would show
        for w in layer.trainable_weights:
            w.assign(np.full(w.shape, 0.5, np.float32))
    before = {w.path: w.numpy() for w in model.trainable_weights}
    model.compile(optimizer=SGDL2(0.1, momentum=0.9, nesterov=True, l2=0.1, l2_kernels_only=True),
                  loss=lambda y, p: 0.0 * keras.ops.sum(p))  # zero loss gradient: only the L2 term moves weights
    model.fit(np.ones((4, 6, 6, 1), np.float32), np.zeros((4, 3), np.float32), epochs=3, verbose=0)
    for w in model.trainable_weights:
        shrunk = np.all(np.abs(w.numpy()) < np.abs(before[w.path]) - 1e-4)
        assert shrunk == w.path.endswith("kernel"), w.path


def test_training_cli_and_fixmatch_use_the_coupled_decay_where_they_say_so():
    from recipes.semi.fixmatch import paper_optimizer
    from recipes.train import make_optimizer

    coupled = make_optimizer("sgd_l2", 0.06, 5e-4, total_steps=100, warmup_steps=0)
    assert isinstance(coupled, SGDL2) and coupled.l2 == 5e-4 and coupled.weight_decay is None
    keras_sgd = make_optimizer("sgd", 0.06, 5e-4, total_steps=100, warmup_steps=0)
    assert not isinstance(keras_sgd, SGDL2) and keras_sgd.weight_decay == 5e-4
    fixmatch = paper_optimizer(1000)
    assert isinstance(fixmatch, SGDL2) and fixmatch.l2_kernels_only and fixmatch.nesterov and fixmatch.l2 == 5e-4


def test_kernels_only_decay_is_the_same_on_one_device_and_on_two_replicas():
    """Under MirroredStrategy update_step sees each replica's copy ("kernel/replica_1:0")."""
    import tensorflow as tf

    def fitted(strategy):
        with strategy.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense",
                                                                             bias_initializer="ones")])
            model.layers[0].kernel.assign(np.ones((4, 3), np.float32))
            model.compile(optimizer=SGDL2(0.1, momentum=0.9, l2=0.1, l2_kernels_only=True),
                          loss=lambda y, p: 0.0 * keras.ops.sum(p))
        model.fit(np.ones((8, 4), np.float32), np.zeros((8, 3), np.float32), batch_size=8, epochs=2, verbose=0)
        layer = model.layers[0]
        copies = [layer.kernel.value] if strategy.num_replicas_in_sync == 1 else layer.kernel.value.values
        return [np.asarray(c) for c in copies], layer.bias.numpy()

    one, bias_one = fitted(tf.distribute.get_strategy())
    two, bias_two = fitted(two_replica_strategy())  # the suite's one MirroredStrategy (see its docstring)
    assert one[0].max() < 0.99 and np.allclose(bias_one, 1.0)
    for copy in two:  # every replica's copy decayed like the single device's
        np.testing.assert_allclose(copy, one[0], rtol=1e-6)
    np.testing.assert_allclose(bias_two, bias_one)


def numpy_lars(weights, targets, lr, momentum, l2, eta, vector_lr_scale, steps, loss_scale=1.0, clip=False):
    """Reference in the Barlow Twins code's form (with clip: NVIDIA LARC's), on the loss
    loss_scale * 0.5 * |w - t|^2."""
    weights = [w.astype(np.float64).copy() for w in weights]
    buffers = [np.zeros_like(w) for w in weights]
    for _ in range(steps):
        for i, (w, t) in enumerate(zip(weights, targets)):
            g, rate = loss_scale * (w - t), lr
            if w.ndim > 1:
                g = g + l2 * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                g = g * (min(trust / lr, 1.0) if clip else trust)
            else:
                rate = lr * vector_lr_scale
            buffers[i] = momentum * buffers[i] + g
            weights[i] = w - rate * buffers[i]
    return weights


def lars_problem():
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=s).astype(np.float32) for s in ((3, 3, 2, 4), (4,), (5, 4))]
    weights.append(np.zeros((2, 3), np.float32))  # a zero matrix: trust ratio 1, not 0/0
    targets = [rng.normal(size=w.shape).astype(np.float32) for w in weights]
    return weights, targets, ["kernel", "bias", "kernel_2", "kernel_3"]


def test_lars_matches_the_numpy_reference():
    weights, targets, names = lars_problem()
    optimizer = LARS(0.5, momentum=0.9, l2=0.01, eta=0.02, vector_lr_scale=0.1)
    got = run_keras(optimizer, weights, targets, names, steps=10)
    want = numpy_lars(weights, targets, 0.5, 0.9, 0.01, 0.02, 0.1, steps=10)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert np.abs(got[3]).max() > 1e-3  # the zero matrix moved (plain SGD step)


@pytest.mark.parametrize("loss_scale", [0.01, 100.0])
def test_lars_clip_matches_the_numpy_reference(loss_scale):
    weights, targets, names = lars_problem()
    got = run_keras(LARS(0.5, momentum=0.9, l2=0.01, eta=0.02, clip=True), weights, targets, names, steps=10,
                    loss_scale=loss_scale)
    want = numpy_lars(weights, targets, 0.5, 0.9, 0.01, 0.02, 1.0, steps=10, loss_scale=loss_scale, clip=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_lars_clip_caps_each_layer_rate_at_the_learning_rate():
    """A clipped layer's rate is min(eta |w| / |g|, lr): plain SGD's step when the gradient is
    small next to the weights, eta |w| (not lr * eta |w|) when it is large."""
    weights, targets, _ = lars_problem()
    w, t = weights[0], targets[0]

    def first_step(scale, clip):
        variable = keras.Variable(w, name="kernel")
        LARS(0.5, momentum=0.9, eta=0.02, clip=clip).apply_gradients([(scale * (variable.value - t), variable)])
        return np.linalg.norm(variable.numpy() - w)

    small_gradient = 1e-4 * np.linalg.norm(w - t)
    np.testing.assert_allclose(first_step(1e-4, clip=True), 0.5 * small_gradient, rtol=1e-4)
    assert first_step(1e-4, clip=False) > 10 * first_step(1e-4, clip=True)
    np.testing.assert_allclose(first_step(1e3, clip=True), 0.02 * np.linalg.norm(w), rtol=1e-4)
    np.testing.assert_allclose(first_step(1e3, clip=False), 0.5 * 0.02 * np.linalg.norm(w), rtol=1e-4)


def test_lars_steps_on_weight_matrices_do_not_depend_on_the_loss_scale():
    """What LARS is for: a loss 1000x larger moves matrices the same, vectors 1000x more."""
    weights, targets, names = lars_problem()

    def steps(scale):
        variables = [keras.Variable(w, name=n) for w, n in zip(weights, names)]
        optimizer = LARS(0.5, momentum=0.9, eta=0.02)
        for _ in range(3):
            optimizer.apply_gradients([(scale * (v.value - t), v) for v, t in zip(variables, targets)])
        return [v.numpy() - w for v, w in zip(variables, weights)]

    small, large = steps(1.0), steps(1000.0)
    np.testing.assert_allclose(large[0], small[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(large[2], small[2], rtol=1e-4, atol=1e-7)
    assert np.abs(large[1]).sum() > 100 * np.abs(small[1]).sum()
    # Each step moves a matrix by lr * eta of its norm (the first step has no momentum yet).
    one = LARS(0.5, momentum=0.9, eta=0.02)
    variable = keras.Variable(weights[0], name="kernel")
    one.apply_gradients([(1000.0 * (variable.value - targets[0]), variable)])
    np.testing.assert_allclose(np.linalg.norm(variable.numpy() - weights[0]), 0.5 * 0.02 * np.linalg.norm(weights[0]),
                               rtol=1e-5)


def test_lars_config_round_trip_and_clear_errors():
    optimizer = LARS(0.3, momentum=0.8, l2=1e-4, eta=0.02, vector_lr_scale=0.024)
    clone = LARS.from_config(optimizer.get_config())
    assert (clone.momentum, clone.l2, clone.eta, clone.vector_lr_scale, clone.clip) == (0.8, 1e-4, 0.02, 0.024, False)
    assert LARS.from_config(LARS(0.3, clip=True).get_config()).clip
    with pytest.raises(ValueError, match="l2"):
        LARS(0.3, weight_decay=1e-4)
    with pytest.raises(ValueError, match="eta must be"):
        LARS(0.3, eta=-1.0)


def test_training_cli_builds_lars_with_extra_arguments_and_names_the_ones_that_do_not_fit():
    from recipes.train import make_optimizer, parse_hparams

    lars = make_optimizer("lars", 0.3, 1e-4, total_steps=100, warmup_steps=10,
                          extra_args=parse_hparams("eta=0.02,vector_lr_scale=0.024"))
    assert isinstance(lars, LARS) and (lars.l2, lars.eta, lars.vector_lr_scale) == (1e-4, 0.02, 0.024)
    with pytest.raises(ValueError, match="eta"):
        make_optimizer("sgd", 0.3, 1e-4, total_steps=100, warmup_steps=0, extra_args={"eta": 0.02})
    with pytest.raises(ValueError, match="Unknown optimizer"):
        make_optimizer("lamb", 0.3, 1e-4, total_steps=100, warmup_steps=0)
    with pytest.raises(ValueError, match="lower --warmup_epochs"):  # a warm-up as long as the run
        make_optimizer("lars", 0.3, 1e-4, total_steps=100, warmup_steps=100)


def test_lars_is_the_same_on_one_device_and_on_two_replicas():
    """The trust ratio is computed on each replica's copy of the weights and the summed gradient."""
    import tensorflow as tf

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)

    def fitted(strategy):
        with strategy.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense",
                                                                             kernel_initializer="ones")])
            model.compile(optimizer=LARS(0.5, momentum=0.9, l2=0.01, eta=0.05), loss="mse")
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        return model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()

    kernel_one, bias_one = fitted(tf.distribute.get_strategy())
    kernel_two, bias_two = fitted(two_replica_strategy())
    assert np.abs(kernel_one - 1.0).max() > 1e-3
    np.testing.assert_allclose(kernel_two, kernel_one, rtol=1e-5)
    np.testing.assert_allclose(bias_two, bias_one, rtol=1e-5, atol=1e-7)
