"""EmbeddingClient over gRPC and REST, retries, and the `zoo serve` / `zoo embed` entry points."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from serving import client as client_mod
from serving import server as server_mod
from serving.batching import BatchingOptions
from serving.client import EmbeddingClient
from serving.errors import ServingError
from serving.server import ModelServer
from serving.testing import ToyEncoder, encode_png, export_toy_model

IMAGES = np.random.default_rng(3).integers(0, 256, (10, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    export_toy_model(base, "toy", 1)
    srv = ModelServer(model_name="toy", model_base_path=f"{base}/toy", file_system_poll_wait_seconds=0,
                      batching=BatchingOptions(max_batch_size=8, batch_timeout_micros=500))
    srv.start()
    srv.base = base
    yield srv
    srv.stop()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_embed_arrays_and_bytes_with_chunking(server, protocol):
    target = server.grpc_target if protocol == "grpc" else f"127.0.0.1:{server.ports['rest']}"
    with EmbeddingClient(target, "toy", protocol=protocol, max_batch=3) as client:
        want = ToyEncoder(seed=1).numpy_embed(IMAGES)
        np.testing.assert_allclose(client.embed(IMAGES), want, atol=1e-5)
        np.testing.assert_allclose(client.embed(IMAGES[0]), want[:1], atol=1e-5)  # one image
        blobs = [encode_png(img.astype(np.uint8)) for img in IMAGES[:4]]
        np.testing.assert_allclose(client.embed(blobs), want[:4], atol=1e-5)
        with pytest.raises(ServingError) as info:
            client.embed([b"junk"])
        assert info.value.code == "INVALID_ARGUMENT"


def test_unknown_model_is_not_found(server):
    with EmbeddingClient(server.grpc_target, "nope") as client, pytest.raises(ServingError) as info:
        client.embed(IMAGES)
    assert info.value.code == "NOT_FOUND"


def test_retries_on_unavailable_then_succeeds(server, monkeypatch):
    client = EmbeddingClient(server.grpc_target, "toy", retries=2, backoff=0.01)
    real, calls = client._grpc_predict, []

    def flaky(*args):
        calls.append(1)
        if len(calls) < 3:
            raise ServingError("UNAVAILABLE", "busy")
        return real(*args)

    monkeypatch.setattr(client, "_grpc_predict", flaky)
    assert client.embed(IMAGES[:2]).shape == (2, 4) and len(calls) == 3
    calls.clear()
    client.retries = 1
    with pytest.raises(ServingError, match="busy"):
        client.embed(IMAGES[:2])
    client.close()


def test_timeout_and_unreachable_server():
    with EmbeddingClient("127.0.0.1:1", "toy", protocol="rest", retries=0, timeout=2) as client:
        with pytest.raises(ServingError) as info:
            client.embed(IMAGES)
        assert info.value.code == "UNAVAILABLE"
    with EmbeddingClient("127.0.0.1:1", "toy", retries=0, timeout=2) as client:
        with pytest.raises(ServingError) as info:
            client.embed(IMAGES)
        assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_zoo_embed_cli_prints_and_saves(server, tmp_path, capsys):
    files = []
    for i, img in enumerate(IMAGES[:3]):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(encode_png(img.astype(np.uint8)))
        files.append(str(path))
    out = tmp_path / "emb.npy"
    assert client_mod.main(["embed", f"--server={server.grpc_target}", "--model=toy", f"--output={out}", *files]) == 0
    np.testing.assert_allclose(np.load(out), ToyEncoder(seed=1).numpy_embed(IMAGES[:3]), atol=1e-5)
    assert client_mod.main([f"--server=http://127.0.0.1:{server.ports['rest']}", "--model=toy", files[0]]) == 0
    assert '"file"' in capsys.readouterr().out
    assert client_mod.main([f"--server={server.grpc_target}", "--model=nope", files[0]]) == 1
    assert client_mod.main([f"--server={server.grpc_target}", "--model=toy", str(tmp_path / "missing.png")]) == 1


def test_serve_cli_runs_until_sigterm(server, tmp_path):
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 1000 }")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/metrics" }')
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--port=0", "--rest_api_port=0", "--model_name=toy",
         f"--model_base_path={server.base}/toy", "--enable_batching", f"--batching_parameters_file={batching}",
         f"--monitoring_config_file={monitoring}", "--backend=python"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        line = proc.stdout.readline()
        match = re.search(r"gRPC (\d+), REST (\d+)", line)
        assert match, line
        grpc_port, rest_port = match.groups()
        with EmbeddingClient(f"127.0.0.1:{grpc_port}", "toy") as client:
            assert client.embed(IMAGES[:2]).shape == (2, 4)
        from serving.testing import http_call
        status, text = http_call(f"http://127.0.0.1:{rest_port}/metrics")
        assert status == 200 and "processed_batch_size" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_serve_cli_reports_bad_flags():
    assert server_mod.main(["--backend=python", "--port=0", "--rest_api_port=-1"]) == 1  # nothing to serve
    assert server_mod.main(["--backend=python", "--model_config_file=/nonexistent/models.config"]) == 1


def test_serve_uses_tensorflow_model_server_when_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "tensorflow_model_server"
    record = tmp_path / "argv.txt"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert server_mod.main(["serve", "--model_name=enc", "--model_base_path=/models/enc", "--enable_batching"]) == 0
    argv = record.read_text().split()
    assert "--model_name=enc" in argv and "--model_base_path=/models/enc" in argv
    assert "--enable_batching=true" in argv and "--port=8500" in argv and "--rest_api_port=8501" in argv
    assert not any(a.startswith(("--host", "--backend")) for a in argv)
    assert "--file_system_poll_wait_seconds=1" in argv  # whole seconds: the binary's flags are int32
    # Our "any free port" is the binary's "REST off": refused rather than silently changed.
    assert server_mod.main(["serve", "--model_base_path=/models/enc", "--rest_api_port=0"]) == 1


def test_zoo_serve_names_resolve_through_the_zoo_store(monkeypatch, tmp_path):
    import zoo
    calls = []

    def fake_base_path(ref, store=None, versions=None):
        calls.append(ref)
        if ref.startswith("missing"):
            raise LookupError("no such model")
        return str(tmp_path / ref.split(":")[0])

    monkeypatch.setattr(zoo, "serving_base_path", fake_base_path)
    monkeypatch.setattr(zoo, "info", lambda ref, store=None: {"version": 3})  # enc_c's "stable" is version 3
    config = server_mod._zoo_config(["enc_a", "enc_b:2", "enc_c:stable"])
    a, b, c = config.model_config_list.config
    assert (a.name, a.base_path, a.model_version_policy.WhichOneof("policy_choice")) == ("enc_a", str(tmp_path / "enc_a"), None)
    assert (b.name, list(b.model_version_policy.specific.versions)) == ("enc_b", [2])
    assert (c.name, list(c.model_version_policy.specific.versions)) == ("enc_c", [3])  # not the latest
    with pytest.raises(ValueError, match="missing"):
        server_mod._zoo_config(["missing"])
    assert server_mod.main(["serve", "--backend=python", "missing"]) == 1
