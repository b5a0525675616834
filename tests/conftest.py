"""Test-wide settings: CPU only, quiet TF, two logical CPU devices, a fixed seed per test.

The logical devices must be configured before TensorFlow initializes its devices,
hence here, at collection time, for the whole session.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same Python/numpy/Keras seed, whatever ran before it.

    Without this, weight initialization depended on which tests had drawn random
    numbers earlier, so a test could pass in the full suite and fail alone.
    """
    keras.utils.set_random_seed(1234)
