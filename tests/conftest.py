"""Test-wide settings: CPU only, quiet TF, two logical CPU devices for distributed tests."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
