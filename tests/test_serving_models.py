"""Model manager: hot reload under load, failed versions, config file polling."""

import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, inference_pb2, predict_pb2, prediction_service_pb2_grpc

from serving.batching import BatchingOptions
from serving.models import ModelManager, single_model_config
from serving.server import ModelServer
from serving.testing import ToyEncoder, export_example_model, export_toy_model, http_call, write_broken_version

State = get_model_status_pb2.ModelVersionStatus.State
IMAGES = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 1)).astype(np.float32)


def test_hot_reload_under_load_has_no_failed_request(tmp_path):
    base = str(tmp_path)
    export_toy_model(base, "toy", 1)
    expected = {v: ToyEncoder(seed=v).numpy_embed(IMAGES) for v in (1, 2)}
    server = ModelServer(model_name="toy", model_base_path=f"{base}/toy", file_system_poll_wait_seconds=0.1,
                         batching=BatchingOptions(max_batch_size=16, batch_timeout_micros=2000))
    server.start()
    results, failures, stop = [], [], threading.Event()
    lock = threading.Lock()

    def grpc_worker():
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "toy"
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(IMAGES))
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = stub.Predict(request, timeout=10)
                    out = tf.make_ndarray(response.outputs["embedding"])
                    version = response.model_spec.version.value
                    with lock:
                        results.append((started, time.monotonic(), version, np.allclose(out, expected[version], atol=1e-5)))
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"gRPC {exc.code()}: {exc.details()}")

    def rest_worker():
        while not stop.is_set():
            started = time.monotonic()
            status, body = http_call(server.rest_url + "/v1/models/toy:predict", "POST", {"instances": IMAGES.tolist()})
            with lock:
                if status != 200:
                    failures.append(f"REST {status}: {body}")
                else:
                    out = np.asarray(body["predictions"], np.float32)
                    version = next((v for v, e in expected.items() if np.allclose(out, e, atol=1e-5)), None)
                    results.append((started, time.monotonic(), version, version is not None))

    threads = [threading.Thread(target=grpc_worker) for _ in range(6)] + [threading.Thread(target=rest_worker) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        export_toy_model(base, "toy", 2)  # a new version lands while 8 clients hammer the server
        deadline = time.monotonic() + 20
        while not any(r[2] == 2 for r in list(results)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.stop()
    assert failures == []
    assert all(ok for *_, ok in results), "an answer matched neither version"
    versions = [r[2] for r in results]
    assert versions.count(1) > 0 and versions.count(2) > 0, versions
    first_v2_done = min(end for start, end, v, _ in results if v == 2)
    late = [v for start, end, v, _ in results if start > first_v2_done]
    assert late and set(late) == {2}, "after the switch every answer must come from the new version"
    assert len(results) > 50


def test_unloadable_new_version_leaves_old_serving_and_is_reported(tmp_path):
    base = str(tmp_path)
    export_toy_model(base, "toy", 1)
    manager = ModelManager(single_model_config("toy", f"{base}/toy"), poll_wait_seconds=0, max_load_retries=0)
    manager.start()
    try:
        write_broken_version(base, "toy", 2)
        manager.poll()
        assert manager.servable("toy").version == 1
        status = dict(manager.status("toy"))
        assert status[1].state == State.AVAILABLE
        assert status[2].state == State.END and status[2].error is not None
        export_toy_model(base, "toy", 3)  # a good newer version replaces both
        manager.poll()
        assert manager.servable("toy").version == 3
        assert dict(manager.status("toy"))[1].state == State.END
    finally:
        manager.stop()


def test_changed_base_path_keeps_serving_the_old_one_until_the_new_one_is_loaded(tmp_path):
    export_toy_model(str(tmp_path / "a"), "toy", 1)
    export_toy_model(str(tmp_path / "b"), "toy", 2)
    manager = ModelManager(single_model_config("toy", f"{tmp_path}/a/toy"), poll_wait_seconds=0)
    manager.start()
    served_while_loading = []
    load = manager._load

    def load_and_look(model, version, status):
        served_while_loading.append(manager.servable("toy").version)  # raises if nothing is served
        load(model, version, status)

    manager._load = load_and_look
    try:
        manager.reload_config(single_model_config("toy", f"{tmp_path}/b/toy"))
        assert served_while_loading == [1]  # the old path answered while the new one loaded
        assert manager.servable("toy").version == 2
        assert dict(manager.status("toy")).keys() == {2}
    finally:
        manager.stop()


def test_multiinference_runs_every_task_on_one_version_when_a_swap_unloads_it_midway(tmp_path, monkeypatch):
    from serving import grpc_services

    base = str(tmp_path)
    export_example_model(base, "examples", 1)
    server = ModelServer(model_name="examples", model_base_path=f"{base}/examples", rest_port=None,
                         file_system_poll_wait_seconds=0, batching=BatchingOptions(max_batch_size=8))
    server.start()
    run = grpc_services.examples.run
    calls = []

    def run_then_swap(*args):
        answer = run(*args)
        if not calls:  # between the two tasks, version 2 lands and version 1 is unloaded
            export_example_model(base, "examples", 2)
            server.manager.poll()
        calls.append(answer[0].version)
        return answer

    monkeypatch.setattr(grpc_services.examples, "run", run_then_swap)
    example = tf.train.Example()
    example.features.feature["x"].float_list.value.extend([1.0, 2.0])
    request = inference_pb2.MultiInferenceRequest(input={"example_list": {"examples": [example]}})
    request.tasks.add(model_spec={"name": "examples"}, method_name="tensorflow/serving/classify")
    request.tasks.add(model_spec={"name": "examples", "signature_name": "regress"},
                      method_name="tensorflow/serving/regress")
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).MultiInference(request, timeout=30)
        assert [result.model_spec.version.value for result in answer.results] == [1, 1]
        assert answer.results[1].regression_result.regressions[0].value == pytest.approx(3.0)
        assert server.manager.servable("examples").version == 2
        # The queue made for the unloaded version's last task does not keep it in memory.
        assert all(queue.servable.version == 2 for queue in server.batcher._queues.values())
    finally:
        server.stop()


def test_version_directory_removed_unloads_it(tmp_path):
    import shutil

    base = str(tmp_path)
    export_toy_model(base, "toy", 1)
    export_toy_model(base, "toy", 2)
    manager = ModelManager(single_model_config("toy", f"{base}/toy"), poll_wait_seconds=0)
    manager.start()
    try:
        assert manager.servable("toy").version == 2
        shutil.rmtree(f"{base}/toy/2")
        manager.poll()
        assert manager.servable("toy").version == 1  # latest{1} falls back to what is on disk
    finally:
        manager.stop()


def test_model_config_file_is_polled(tmp_path):
    base = str(tmp_path)
    export_toy_model(base, "toy", 1)
    config_file = tmp_path / "models.config"
    entry = 'config { name: "%s" base_path: "' + base + '/toy" model_platform: "tensorflow" }'
    config_file.write_text("model_config_list { %s }" % (entry % "a"))
    server = ModelServer(model_config_file=str(config_file), model_config_file_poll_wait_seconds=0.1,
                         grpc_port=None, file_system_poll_wait_seconds=0)
    server.start()
    try:
        assert http_call(server.rest_url + "/v1/models/a")[0] == 200
        config_file.write_text("model_config_list { %s %s }" % (entry % "a", entry % "b"))
        deadline = time.monotonic() + 10
        while http_call(server.rest_url + "/v1/models/b")[0] != 200:
            assert time.monotonic() < deadline, "model b never appeared"
            time.sleep(0.1)
        config_file.write_text("model_config_list { not valid")  # a broken edit keeps the models serving
        time.sleep(0.4)
        assert http_call(server.rest_url + "/v1/models/b")[0] == 200
    finally:
        server.stop()


def test_invalid_configs_are_rejected():
    from serving import errors
    config = single_model_config("a", "/tmp/a")
    config.model_config_list.config.add(name="a", base_path="/tmp/b")
    with pytest.raises(errors.ServingError, match="multiple times"):
        ModelManager(config)
