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
                                     predict_pb2, prediction_service_pb2_grpc, regression_pb2)

from serving import errors
from serving.core import ServingCore
from serving.servable import CLASSIFY_METHOD, REGRESS_METHOD

log = logging.getLogger("serving.grpc")


def _spec_args(spec):
    """(name, version or None, label or None) of a ModelSpec."""
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    if not spec.name:
        raise errors.invalid_argument("Missing ModelSpec name")
    return spec.name, version, label


def _fill_spec(spec, servable, signature_name):
    spec.name = servable.name
    spec.version.value = servable.version
    spec.signature_name = signature_name


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


def _timeout(context):
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServingCore):
        self.core = core

    @_rpc("predict")
    def Predict(self, request, context, obs):
        name, version, label = _spec_args(request.model_spec)
        inputs = {k: _to_array(k, v) for k, v in request.inputs.items()}
        servable, sig, outputs = self.core.predict(
            name, version, label, request.model_spec.signature_name or None, inputs,
            output_filter=list(request.output_filter), strict_dtypes=True, timeout=_timeout(context))
        obs.version = str(servable.version)
        response = predict_pb2.PredictResponse()
        _fill_spec(response.model_spec, servable, sig.name)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    @_rpc("get_model_metadata")
    def GetModelMetadata(self, request, context, obs):
        name, version, label = _spec_args(request.model_spec)
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
        return self._answer_examples(request, context, obs, CLASSIFY_METHOD,
                                     classification_pb2.ClassificationResponse(), _fill_classifications)

    @_rpc("regress")
    def Regress(self, request, context, obs):
        return self._answer_examples(request, context, obs, REGRESS_METHOD,
                                     regression_pb2.RegressionResponse(), _fill_regressions)

    def _answer_examples(self, request, context, obs, method, response, fill_result):
        servable, sig, outputs, n = self._run_examples(request, method, context)
        obs.version = str(servable.version)
        _fill_spec(response.model_spec, servable, sig.name)
        fill_result(response.result, outputs, n)
        return response

    @_rpc("multi_inference")
    def MultiInference(self, request, context, obs):
        response = inference_pb2.MultiInferenceResponse()
        if not request.tasks:
            raise errors.invalid_argument("MultiInferenceRequest must have at least one task")
        for task in request.tasks:
            sub = classification_pb2.ClassificationRequest(model_spec=task.model_spec, input=request.input)
            method = task.method_name
            if method not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise errors.unimplemented(f"Unsupported signature method_name: {method}")
            servable, sig, outputs, n = self._run_examples(sub, method, context)
            result = response.results.add()
            _fill_spec(result.model_spec, servable, sig.name)
            if method == CLASSIFY_METHOD:
                _fill_classifications(result.classification_result, outputs, n)
            else:
                _fill_regressions(result.regression_result, outputs, n)
        return response

    def _run_examples(self, request, method, context):
        name, version, label = _spec_args(request.model_spec)
        servable = self.core.manager.servable(name, version, label)
        kind = method.rsplit("/", 1)[-1]
        if not any(s.method_name == method for s in servable.signatures.values()):
            raise errors.unimplemented(
                f"{kind.capitalize()} is not supported by model {name} version {servable.version}: "
                f"it has no signature with method_name {method}. Use Predict.")
        sig = servable.signature(request.model_spec.signature_name or None)
        if sig.method_name != method:
            raise errors.invalid_argument(
                f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}")
        examples = _serialized_examples(request.input)
        (key,) = sig.inputs
        _, _, outputs = self.core.predict(name, servable.version, None, sig.name,
                                          {key: np.array(examples, dtype=object)}, timeout=_timeout(context))
        return servable, sig, outputs, len(examples)


def _serialized_examples(inp) -> list[bytes]:
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        examples = list(inp.example_list.examples)
    elif kind == "example_list_with_context":
        examples = []
        for ex in inp.example_list_with_context.examples:
            merged = type(ex)()
            merged.CopyFrom(inp.example_list_with_context.context)
            merged.MergeFrom(ex)
            examples.append(merged)
    else:
        raise errors.invalid_argument("Input is empty")
    if not examples:
        raise errors.invalid_argument("Input is empty")
    return [e.SerializeToString() for e in examples]


def _fill_classifications(result, outputs, n):
    classes, scores = outputs.get("classes"), outputs.get("scores")
    if classes is None and scores is None:
        raise errors.invalid_argument("Classification signature needs a 'classes' or 'scores' output")
    for i in range(n):
        row = result.classifications.add()
        k = (classes if classes is not None else scores)[i].shape[-1]
        for j in range(k):
            cls = row.classes.add()
            if classes is not None:
                value = classes[i][j]
                cls.label = value.decode() if isinstance(value, bytes) else str(value)
            if scores is not None:
                cls.score = float(scores[i][j])


def _fill_regressions(result, outputs, n):
    if "outputs" not in outputs:
        raise errors.invalid_argument("Regression signature needs an 'outputs' output")
    values = np.reshape(outputs["outputs"], (n,))
    for v in values:
        result.regressions.add(value=float(v))


def metadata_response(servable) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, value in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(value)
    response.metadata["signature_def"].Pack(sig_map)
    return response


def status_response(manager, name, version, label) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for v, st in manager.status(name, version, label):
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
        name, version, label = _spec_args(request.model_spec)
        return status_response(self.core.manager, name, version, label)

    @_rpc("reload_config")
    def HandleReloadConfigRequest(self, request, context, obs):
        if request.config.WhichOneof("config") != "model_config_list":
            raise errors.invalid_argument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported")
        self.core.manager.reload_config(request.config)
        if self._on_reload:
            self._on_reload(request.config)
        return model_management_pb2.ReloadConfigResponse()  # status left OK (error_code 0)


def add_services(server: grpc.Server, core: ServingCore, on_reload=None):
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core, on_reload), server)
