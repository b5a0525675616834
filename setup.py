"""Self-supervised model zoo for Keras 3 / TensorFlow: recipes, zoo, serving."""
from setuptools import find_packages, setup

setup(
    name="ssl-zoo",
    version="0.1.0",
    description="Self-supervised encoders for Keras: train (recipes), publish/load (zoo), serve (serving).",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["zoo", "zoo.*", "recipes", "recipes.*", "serving", "serving.*"]),
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorflow-datasets==4.9.10",
        "tensorflow-serving-api==2.21.0",
        "grpcio==1.85.1",
        "protobuf==7.36.2",
        "absl-py==2.5.1",
        "tensorboard==2.21.0",
        "importlib-resources==7.1.0",  # tensorflow-datasets 4.9.10 imports it; etils no longer installs it
        "numpy==2.4.6",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "pytest-xdist==3.8.0", "tf2onnx==1.17.0", "onnx==1.23.2", "onnxruntime==1.32.0"],
        "bench": ["matplotlib==3.11.2", "scikit-learn==1.9.1"],
    },
    entry_points={"console_scripts": ["zoo=zoo.cli:main"]},
)
