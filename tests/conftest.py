"""Test-wide settings: CPU only, quiet TF, two logical CPU devices for distributed tests.

The logical devices must be configured before TensorFlow initializes its devices,
hence here, at collection time, for the whole session.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
