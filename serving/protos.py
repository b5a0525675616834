"""Config messages tensorflow_model_server reads but the tensorflow-serving-api wheel lacks.

`--batching_parameters_file` holds a `tensorflow.serving.BatchingParameters` and
`--monitoring_config_file` a `tensorflow.serving.MonitoringConfig` text proto. The pip package
ships neither .proto, so we declare the same messages (same package, names, numbers and
wrapper types) here; text files written for the real server parse unchanged.
ModelServerConfig does ship and is used as is (`tensorflow_serving.config`).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2  # noqa: F401  (registers google/protobuf/wrappers.proto)
from tensorflow_serving.config import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _field(name, number, type_, type_name=None, repeated=False):
    field = _F(name=name, number=number, type=type_,
               label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    return field


def _build():
    f = descriptor_pb2.FileDescriptorProto(
        name="ssl_zoo/serving/tf_serving_configs.proto", package="tensorflow.serving",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    i64, s, b = ".google.protobuf.Int64Value", ".google.protobuf.StringValue", ".google.protobuf.BoolValue"
    msg = f.message_type.add(name="BatchingParameters")
    msg.field.extend([
        _field("max_batch_size", 1, _F.TYPE_MESSAGE, i64),
        _field("batch_timeout_micros", 2, _F.TYPE_MESSAGE, i64),
        _field("max_enqueued_batches", 3, _F.TYPE_MESSAGE, i64),
        _field("num_batch_threads", 4, _F.TYPE_MESSAGE, i64),
        _field("thread_pool_name", 5, _F.TYPE_MESSAGE, s),
        _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
        _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL),
        _field("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, b),
        _field("max_execution_batch_size", 9, _F.TYPE_MESSAGE, i64),
    ])
    prom = f.message_type.add(name="PrometheusConfig")
    prom.field.extend([_field("enable", 1, _F.TYPE_BOOL), _field("path", 2, _F.TYPE_STRING)])
    mon = f.message_type.add(name="MonitoringConfig")
    mon.field.extend([_field("prometheus_config", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")])
    pool = descriptor_pool.Default()
    try:
        pool.Add(f)
    except TypeError:  # already added (module re-imported)
        pass
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{n}"))
    return get("BatchingParameters"), get("PrometheusConfig"), get("MonitoringConfig")


BatchingParameters, PrometheusConfig, MonitoringConfig = _build()
ModelServerConfig = model_server_config_pb2.ModelServerConfig


def parse_text_file(path: str, message_class):
    """Reads a text proto file into `message_class`; errors name the file and the problem."""
    import tensorflow as tf

    try:
        text = tf.io.gfile.GFile(path, "r").read()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {message_class.DESCRIPTOR.name} file {path!r}: {exc}") from exc
    try:
        return text_format.Parse(text, message_class())
    except text_format.ParseError as exc:
        raise ValueError(f"{path}: not a valid {message_class.DESCRIPTOR.full_name} text proto: {exc}") from exc
