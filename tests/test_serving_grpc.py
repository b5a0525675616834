"""gRPC API of serving.server, judged by the official tensorflow-serving-api stubs."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2

from serving.server import ModelServer
from serving.testing import ToyEncoder, encode_png, export_example_model, export_toy_model, write_broken_version

CONFIG = """
model_config_list {
  config {
    name: "toy" base_path: "%(base)s/toy" model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config { name: "latest" base_path: "%(base)s/toy" model_platform: "tensorflow" }
  config {
    name: "pinned" base_path: "%(base)s/toy" model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 } }
  }
  config { name: "examples" base_path: "%(base)s/examples" model_platform: "tensorflow" }
  config {
    name: "broken" base_path: "%(base)s/broken" model_platform: "tensorflow"
    model_version_policy { all {} }
  }
}
"""
State = get_model_status_pb2.ModelVersionStatus.State


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    export_toy_model(base, "toy", 1)
    export_toy_model(base, "toy", 2)
    export_toy_model(base, "broken", 1)
    export_example_model(base, "examples", 1)
    write_broken_version(base, "broken", 2)
    config = text_format.Parse(CONFIG % {"base": base}, model_server_config_pb2.ModelServerConfig())
    srv = ModelServer(config, rest_port=None, file_system_poll_wait_seconds=0)
    srv.start()
    srv.base = base
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture
def predict(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture
def models(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


IMAGES = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.float32)


def predict_request(name="toy", inputs=None, version=None, label=None, signature=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if signature:
        request.model_spec.signature_name = signature
    for key, value in (inputs if inputs is not None else {"images": IMAGES}).items():
        request.inputs[key].CopyFrom(value if isinstance(value, type(request.inputs[key])) else tf.make_tensor_proto(value))
    return request


def expect_code(call, code):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_predict_latest_version_and_specific_versions(predict):
    response = predict.Predict(predict_request())
    assert response.model_spec.name == "toy"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["embedding"]), ToyEncoder(seed=2).numpy_embed(IMAGES),
                               rtol=1e-5, atol=1e-6)
    # Values in the typed field, as TF Serving's Predict sends them (clients read `.float_val`).
    embedding = response.outputs["embedding"]
    assert not embedding.tensor_content and len(embedding.float_val) == np.prod(tf.make_ndarray(embedding).shape)
    v1 = predict.Predict(predict_request(version=1))
    assert v1.model_spec.version.value == 1
    np.testing.assert_allclose(tf.make_ndarray(v1.outputs["embedding"]), ToyEncoder(seed=1).numpy_embed(IMAGES),
                               rtol=1e-5, atol=1e-6)


def test_labels_route_to_their_versions(predict):
    assert predict.Predict(predict_request(label="stable")).model_spec.version.value == 1
    assert predict.Predict(predict_request(label="canary")).model_spec.version.value == 2
    expect_code(lambda: predict.Predict(predict_request(label="nope")), grpc.StatusCode.INVALID_ARGUMENT)


def test_version_policies(models, predict):
    def versions(name):
        status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": name}))
        return {s.version: s.state for s in status.model_version_status}

    assert versions("toy") == {1: State.AVAILABLE, 2: State.AVAILABLE}  # all
    assert versions("latest") == {2: State.AVAILABLE}                  # default latest{1}
    assert versions("pinned") == {1: State.AVAILABLE}                  # specific
    assert predict.Predict(predict_request("pinned")).model_spec.version.value == 1
    expect_code(lambda: predict.Predict(predict_request("latest", version=1)), grpc.StatusCode.NOT_FOUND)


def test_bytes_signature_and_output_filter(predict):
    blobs = [encode_png(img.astype(np.uint8)) for img in IMAGES]
    response = predict.Predict(predict_request(inputs={"image_bytes": np.array(blobs, dtype=object)},
                                               signature="embed_bytes"))
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["embedding"]), ToyEncoder(seed=2).numpy_embed(IMAGES),
                               rtol=1e-5, atol=1e-6)
    request = predict_request()
    request.output_filter.append("nope")
    expect_code(lambda: predict.Predict(request), grpc.StatusCode.INVALID_ARGUMENT)
    twice = predict_request()
    twice.output_filter.extend(["embedding", "embedding"])
    assert expect_code(lambda: predict.Predict(twice), grpc.StatusCode.INVALID_ARGUMENT) == \
        "duplicate output tensor alias: embedding"


@pytest.mark.parametrize("case, code", [
    ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT),
    ("missing_input", grpc.StatusCode.INVALID_ARGUMENT),
    ("corrupt_image", grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown_model", grpc.StatusCode.NOT_FOUND),
    ("unknown_version", grpc.StatusCode.NOT_FOUND),
    ("unknown_signature", grpc.StatusCode.FAILED_PRECONDITION),
    ("no_name", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_canonical_codes_and_server_keeps_serving(predict, case, code):
    requests = {
        "wrong_dtype": predict_request(inputs={"images": IMAGES.astype(np.float64)}),
        "wrong_shape": predict_request(inputs={"images": np.zeros((2, 9, 8, 1), np.float32)}),
        "missing_input": predict_request(inputs={"pixels": IMAGES}),
        "corrupt_image": predict_request(inputs={"image_bytes": np.array([b"not an image"], dtype=object)},
                                         signature="embed_bytes"),
        "unknown_model": predict_request("nope"),
        "unknown_version": predict_request(version=7),
        "unknown_signature": predict_request(signature="nope"),
        "no_name": predict_request(""),
    }
    details = expect_code(lambda: predict.Predict(requests[case]), code)
    assert details  # says what went wrong
    assert predict.Predict(predict_request()).model_spec.version.value == 2


def test_get_model_metadata(predict):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "toy"
    response = predict.GetModelMetadata(request)
    assert response.model_spec.version.value == 2
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    default = sig_map.signature_def["serving_default"]
    assert default.inputs["images"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1, 8, 8, 1]
    assert "embedding" in default.outputs
    assert sig_map.signature_def["embed_bytes"].inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    bad = get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "toy"}, metadata_field=["nope"])
    expect_code(lambda: predict.GetModelMetadata(bad), grpc.StatusCode.INVALID_ARGUMENT)


def test_model_status_reports_unloadable_version_and_others_keep_serving(models, predict):
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "broken"}))
    row, ok = status.model_version_status  # newest first, as TF Serving
    assert (ok.version, ok.state, ok.status.error_code) == (1, State.AVAILABLE, 0)
    assert row.version == 2 and row.state == State.END
    assert row.status.error_code != 0 and row.status.error_message
    assert predict.Predict(predict_request("broken")).model_spec.version.value == 1
    one = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "toy", "version": {"value": 1}}))
    assert [(s.version, s.state, s.status.error_code) for s in one.model_version_status] == [(1, State.AVAILABLE, 0)]
    expect_code(lambda: models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"})),
                grpc.StatusCode.NOT_FOUND)


def test_classify_regress_multiinference_refused_without_such_signature(predict):
    """TF Serving: INVALID_ARGUMENT "Expected classification signature method_name to be ..."."""
    examples = {"model_spec": {"name": "toy"}, "input": {"example_list": {"examples": [{}]}}}
    expect_code(lambda: predict.Classify(classification_pb2.ClassificationRequest(**examples)),
                grpc.StatusCode.INVALID_ARGUMENT)
    expect_code(lambda: predict.Regress(regression_pb2.RegressionRequest(**examples)),
                grpc.StatusCode.INVALID_ARGUMENT)
    multi = inference_pb2.MultiInferenceRequest(input=examples["input"])
    multi.tasks.add(model_spec={"name": "toy"}, method_name="tensorflow/serving/classify")
    expect_code(lambda: predict.MultiInference(multi), grpc.StatusCode.INVALID_ARGUMENT)
    multi.tasks[0].method_name = "tensorflow/serving/predict"
    expect_code(lambda: predict.MultiInference(multi), grpc.StatusCode.UNIMPLEMENTED)


def _example(x):
    return {"features": {"feature": {"x": {"float_list": {"value": list(x)}}}}}


def test_classify_regress_and_multiinference_answer_from_example_signatures(predict):
    xs = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    softmax = np.exp(xs) / np.exp(xs).sum(axis=1, keepdims=True)
    examples = {"example_list": {"examples": [_example(x) for x in xs]}}

    answer = predict.Classify(classification_pb2.ClassificationRequest(model_spec={"name": "examples"}, input=examples))
    assert (answer.model_spec.version.value, answer.model_spec.signature_name) == (1, "serving_default")
    rows = answer.result.classifications
    assert [[c.label for c in row.classes] for row in rows] == [["cat", "dog"]] * 2
    np.testing.assert_allclose([[c.score for c in row.classes] for row in rows], softmax, rtol=1e-6)

    regress_spec = {"name": "examples", "signature_name": "regress"}
    answer = predict.Regress(regression_pb2.RegressionRequest(model_spec=regress_spec, input=examples))
    assert answer.model_spec.signature_name == "regress"
    np.testing.assert_allclose([r.value for r in answer.result.regressions], xs.sum(axis=1), rtol=1e-6)

    multi = inference_pb2.MultiInferenceRequest(input=examples)
    multi.tasks.add(model_spec={"name": "examples"}, method_name="tensorflow/serving/classify")
    multi.tasks.add(model_spec=regress_spec, method_name="tensorflow/serving/regress")
    classified, regressed = predict.MultiInference(multi).results
    rows = classified.classification_result.classifications
    np.testing.assert_allclose([[c.score for c in row.classes] for row in rows], softmax, rtol=1e-6)
    np.testing.assert_allclose([r.value for r in regressed.regression_result.regressions], xs.sum(axis=1), rtol=1e-6)

    assert classified.model_spec.version.value == regressed.model_spec.version.value == 1
    for first, second in [({"name": "examples"}, {"name": "toy"}), ({"name": "examples"}, {"name": "examples"})]:
        bad = inference_pb2.MultiInferenceRequest(input=examples)  # two models, or one signature twice
        bad.tasks.add(model_spec=first, method_name="tensorflow/serving/classify")
        bad.tasks.add(model_spec=second, method_name="tensorflow/serving/classify")
        expect_code(lambda: predict.MultiInference(bad), grpc.StatusCode.INVALID_ARGUMENT)

    # The context's features reach every example; a signature of the other kind is refused.
    with_context = {"example_list_with_context": {"context": _example([3.0, 0.5]), "examples": [{}, {}]}}
    answer = predict.Regress(regression_pb2.RegressionRequest(model_spec=regress_spec, input=with_context))
    assert [r.value for r in answer.result.regressions] == [3.5, 3.5]
    classify_signature = regression_pb2.RegressionRequest(model_spec={"name": "examples"}, input=examples)
    expect_code(lambda: predict.Regress(classify_signature), grpc.StatusCode.INVALID_ARGUMENT)


def test_reload_config_adds_and_removes_models(server, models, predict):
    config = model_server_config_pb2.ModelServerConfig()
    config.CopyFrom(server.manager.config)
    config.model_config_list.config.add(name="extra", base_path=f"{server.base}/toy", model_platform="tensorflow")
    models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config))
    assert predict.Predict(predict_request("extra")).model_spec.name == "extra"
    del config.model_config_list.config[-1]
    models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config))
    expect_code(lambda: predict.Predict(predict_request("extra")), grpc.StatusCode.NOT_FOUND)
    # A model with nothing loadable: the config applies, the reload reports it (TF Serving: UNKNOWN).
    config.model_config_list.config.add(name="empty", base_path=f"{server.base}/nothing_here",
                                        model_platform="tensorflow")
    details = expect_code(lambda: models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(
        config=config)), grpc.StatusCode.UNKNOWN)
    assert "Some models did not become available: {empty}" in details
    del config.model_config_list.config[-1]
    models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config))
    bad = model_server_config_pb2.ModelServerConfig()
    bad.model_config_list.config.add(name="x", base_path="/tmp/x", model_platform="pytorch")
    expect_code(lambda: models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=bad)),
                grpc.StatusCode.INVALID_ARGUMENT)
    assert predict.Predict(predict_request()).model_spec.version.value == 2  # old config still serves
