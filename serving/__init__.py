"""Serving: a TensorFlow-Serving-compatible gRPC + REST server for zoo encoders, and its client.

`serving.server.ModelServer` runs in-process; `serving.server.main` is `zoo serve`;
`serving.client.EmbeddingClient` talks to it (or to the real tensorflow_model_server).
"""
