"""gRPC front end: PredictionService and ModelService from tensorflow_serving.apis.

Servicers subclass the official generated bases, so method names, messages and paths are
TF Serving's own. Failures abort the call with the canonical code of the ServingError.
"""

from __future__ import annotations

import functools
import logging

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from serving import errors, examples
from serving.core import ServingCore, fill_model_spec, spec_args
from serving.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, REGRESS_METHOD

log = logging.getLogger("serving.grpc")


def _rpc(api):
    """Wraps a servicer method: ServingError -> canonical gRPC status; metrics per call."""
    def wrap(method):
        @functools.wraps(method)
        def handler(self, request, context):
            obs = self.core.observe(api, "GRPC")
            try:
                with obs:
                    spec = getattr(request, "model_spec", None)
                    obs.model = spec.name if spec is not None else None
                    return method(self, request, context, obs)
            except errors.ServingError as exc:
                context.abort(exc.grpc_code, exc.message)
            except Exception as exc:  # noqa: BLE001  (never let a bug end the server)
                log.exception("%s failed", api)
                context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return handler
    return wrap


def _to_array(key, proto) -> np.ndarray:
    try:
        return tf.make_ndarray(proto)
    except Exception as exc:  # noqa: BLE001
        raise errors.invalid_argument(f"Input '{key}' is not a valid TensorProto: {exc}") from exc


# The TensorProto field TF Serving fills for each output dtype (`Tensor::AsProtoField`, its
# Predict default), so clients that read e.g. `outputs["embedding"].float_val` get the values.
_PROTO_FIELDS = {tf.float32: "float_val", tf.float64: "double_val", tf.int32: "int_val", tf.int16: "int_val",
                 tf.int8: "int_val", tf.uint8: "int_val", tf.uint16: "int_val", tf.int64: "int64_val",
                 tf.uint32: "uint32_val", tf.uint64: "uint64_val", tf.bool: "bool_val"}


def as_proto_field(value) -> tf.compat.v1.TensorProto:
    """`value` as a TensorProto with its values in the typed field, not `tensor_content`."""
    proto = tf.make_tensor_proto(value)
    field = _PROTO_FIELDS.get(tf.as_dtype(proto.dtype))
    if proto.tensor_content and field:
        proto.ClearField("tensor_content")
        getattr(proto, field).extend(np.asarray(value).ravel().tolist())
    return proto


def _timeout(context):
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServingCore):
        self.core = core

    @_rpc("predict")
    def Predict(self, request, context, obs):
        name, version, label = spec_args(request.model_spec)
        inputs = {k: _to_array(k, v) for k, v in request.inputs.items()}
        servable, sig, outputs = self.core.predict(
            name, version, label, request.model_spec.signature_name or None, inputs,
            output_filter=list(request.output_filter), strict_dtypes=True, timeout=_timeout(context))
        obs.version = str(servable.version)
        response = predict_pb2.PredictResponse()
        fill_model_spec(response.model_spec, servable, sig.name)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(as_proto_field(value))
        return response

    @_rpc("get_model_metadata")
    def GetModelMetadata(self, request, context, obs):
        name, version, label = spec_args(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise errors.invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        unsupported = [f for f in fields if f != "signature_def"]
        if unsupported:
            raise errors.invalid_argument(f"Metadata field {unsupported[0]} is not supported")
        servable = self.core.manager.servable(name, version, label)
        obs.version = str(servable.version)
        return metadata_response(servable)

    # Classify / Regress take tf.Examples and run a signature of that method kind.
    @_rpc("classify")
    def Classify(self, request, context, obs):
        response = examples.classify(self.core, request, _timeout(context))
        obs.version = str(response.model_spec.version.value)
        return response

    @_rpc("regress")
    def Regress(self, request, context, obs):
        response = examples.regress(self.core, request, _timeout(context))
        obs.version = str(response.model_spec.version.value)
        return response

    @_rpc("multi_inference")
    def MultiInference(self, request, context, obs):
        response = inference_pb2.MultiInferenceResponse()
        if not request.tasks:
            raise errors.invalid_argument("MultiInferenceRequest must have at least one task")
        if len({t.model_spec.name for t in request.tasks}) > 1:
            raise errors.invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        seen = set()
        for task in request.tasks:  # the whole request is checked before any task runs
            signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature_name in seen:
                raise errors.invalid_argument(f"Duplicate evaluation of signature: {signature_name}")
            seen.add(signature_name)
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise errors.unimplemented(f"Unsupported signature method_name: {task.method_name}")
        servable = None  # every task runs on the servable the first one resolved, even if a swap unloads it
        for task in request.tasks:
            sub = classification_pb2.ClassificationRequest(model_spec=task.model_spec, input=request.input)
            method = task.method_name
            servable, sig, outputs, n = examples.run(self.core, sub, method, _timeout(context), servable)
            result = response.results.add()
            fill_model_spec(result.model_spec, servable, sig.name)
            if method == CLASSIFY_METHOD:
                examples.fill_classifications(result.classification_result, outputs, n)
            else:
                examples.fill_regressions(result.regression_result, outputs, n)
        return response


def metadata_response(servable) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, value in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(value)
    response.metadata["signature_def"].Pack(sig_map)
    return response


def status_response(manager, name, version) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for v, st in manager.status(name, version):
        row = response.model_version_status.add(version=v, state=st.state)
        row.status.SetInParent()  # TF Serving always reports a status (error_code OK if fine)
        if st.error is not None:
            row.status.error_code = st.error.proto_code
            row.status.error_message = st.error.message
    return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServingCore, on_reload=None):
        self.core = core
        self._on_reload = on_reload

    @_rpc("get_model_status")
    def GetModelStatus(self, request, context, obs):
        name, version, _ = spec_args(request.model_spec)  # TF Serving ignores a version label here
        return status_response(self.core.manager, name, version)

    @_rpc("reload_config")
    def HandleReloadConfigRequest(self, request, context, obs):
        if request.config.WhichOneof("config") != "model_config_list":
            raise errors.invalid_argument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported")
        self.core.manager.reload_config(request.config)
        if self._on_reload:
            self._on_reload(request.config)
        missing = self.core.manager.unavailable_models()
        if missing:  # TF Serving's ServerCore waits for every configured model, then fails the reload
            raise errors.unknown(f"Some models did not become available: {{{', '.join(missing)}}}")
        return model_management_pb2.ReloadConfigResponse()  # status left OK (error_code 0)


def add_services(server: grpc.Server, core: ServingCore, on_reload=None):
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core, on_reload), server)
