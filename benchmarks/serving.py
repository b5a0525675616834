"""Serving benchmark: throughput and latency of gRPC / REST, with and without batching,
next to calling the same SavedModel in-process on the same inputs.

    .venv/bin/python benchmarks/serving.py [--seconds=3] [--clients=4]

Encoder: zoo.backbones resnet18_small (28, 28, 1), width 0.25, exported with zoo.export.
The server runs in its own process (as in production: client and server do not share a
GIL); requests are pre-encoded so the numbers measure serving, not client-side encoding.
  latency:    one client, sequential requests (p50 / p99 over --seconds)
  throughput: --clients concurrent clients for --seconds (images per second)
Writes benchmarks/results/serving.json and prints a markdown table. Fixed seeds; ~1-2 min.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (28, 28, 1)


def export_encoder(base: str) -> str:
    import keras
    from zoo import backbones, export

    keras.utils.set_random_seed(0)
    encoder = backbones.build("resnet18_small", SHAPE, width=0.25)
    export.export_saved_model(encoder, f"{base}/enc", version=1)
    return f"{base}/enc"


def summarize(latencies: list[float], images: int, seconds: float) -> dict:
    lat = np.asarray(latencies) * 1e3
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "requests": len(latencies), "images_per_s": images / seconds}


def throughput(call, batch: int, seconds: float, clients: int) -> float:
    """Images per second with `clients` concurrent callers."""
    counts, stop = [0] * clients, threading.Event()

    def worker(i):
        while not stop.is_set():
            call()
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) * batch / (time.monotonic() - start)


def measure(call, batch: int, seconds: float, clients: int) -> dict:
    """Sequential latency with one caller, then throughput with `clients` concurrent callers."""
    for _ in range(3):
        call()  # warm-up
    lat, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    result = summarize(lat, len(lat) * batch, seconds)
    result["sequential_images_per_s"] = result.pop("images_per_s")
    result["images_per_s"] = throughput(call, batch, seconds, clients)
    return result


def start_server(base_path: str, batching_file: str | None) -> tuple[subprocess.Popen, int, int]:
    argv = [sys.executable, "-m", "serving.server", "--backend=python", "--port=0", "--rest_api_port=0",
            "--model_name=enc", f"--model_base_path={base_path}", "--file_system_poll_wait_seconds=0"]
    if batching_file:
        argv += ["--enable_batching", f"--batching_parameters_file={batching_file}"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    match = re.search(r"gRPC (\d+), REST (\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(match[1]), int(match[2])


def grpc_caller(port: int, images: np.ndarray):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "enc"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))

    def call():
        response = stub.Predict(request, timeout=30)
        assert response.outputs["embedding"].tensor_shape.dim[0].size == len(images)

    return call


def rest_caller(port: int, images: np.ndarray):
    body = json.dumps({"instances": images.tolist()}).encode()
    local = threading.local()

    def call():
        conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local.conn = conn
        conn.request("POST", "/v1/models/enc:predict", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        assert response.status == 200, payload[:200]

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks/results/serving.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    inputs = {b: rng.integers(0, 256, (b,) + SHAPE).astype(np.float32) for b in (1, 32)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_path = export_encoder(tmp)
        batching_file = os.path.join(tmp, "batching.config")
        with open(batching_file, "w") as f:
            f.write("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 1000 }\n"
                    "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 64 }\n")

        model = tf.saved_model.load(f"{base_path}/1")
        fn = model.signatures["serving_default"]
        local = {b: (lambda t=tf.constant(x): fn(images=t)["embedding"].numpy()) for b, x in inputs.items()}
        for batch in inputs:
            r = measure(local[batch], batch, args.seconds, args.clients)
            rows.append({"mode": "in-process SavedModel", "protocol": "-", "batching": False, "batch": batch, **r})
            print(rows[-1], flush=True)

        for batching in (False, True):
            proc, grpc_port, rest_port = start_server(base_path, batching_file if batching else None)
            try:
                for protocol, port, make in (("grpc", grpc_port, grpc_caller), ("rest", rest_port, rest_caller)):
                    for batch, images in inputs.items():
                        r = measure(make(port, images), batch, args.seconds, args.clients)
                        # The machine is shared: re-measure the in-process baseline right after,
                        # so each ratio compares like with like under the same background load.
                        r["adjacent_in_process_images_per_s"] = throughput(local[batch], batch, args.seconds, args.clients)
                        rows.append({"mode": "server", "protocol": protocol, "batching": batching, "batch": batch, **r})
                        print(rows[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    base = {r["batch"]: r for r in rows if r["mode"].startswith("in-process")}
    for r in rows:
        reference = r.get("adjacent_in_process_images_per_s", base[r["batch"]]["images_per_s"])
        r["throughput_vs_in_process"] = r["images_per_s"] / reference
        r["p50_overhead_ms"] = r["p50_ms"] - base[r["batch"]]["p50_ms"]
    result = {
        "protocol": {"encoder": "zoo.backbones resnet18_small (28,28,1) width=0.25 via zoo.export",
                     "seconds_per_phase": args.seconds, "concurrent_clients": args.clients, "seed": 0,
                     "batching_parameters": "max_batch_size 128, batch_timeout_micros 1000, num_batch_threads 2",
                     "latency": "one client, sequential; throughput: concurrent clients, pre-encoded requests",
                     "ratio": "server images/s over an in-process run (same clients) measured right after it",
                     "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                              "tensorflow": tf.__version__}},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.output}\n")
    print("| mode | protocol | batching | batch | p50 ms | p99 ms | p50 overhead ms | images/s | vs in-process (adjacent) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['protocol']} | {'on' if r['batching'] else 'off'} | {r['batch']} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['p50_overhead_ms']:+.2f} | {r['images_per_s']:.0f} | {r['throughput_vs_in_process']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
