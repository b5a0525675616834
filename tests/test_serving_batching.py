"""Server-side batching: merging, splitting, padding, isolation of bad requests, back-pressure."""

import threading

import numpy as np
import pytest

from serving import errors
from serving.batching import BatchingOptions, BatchScheduler
from serving.protos import BatchingParameters
from serving.servable import Servable
from serving.testing import ToyEncoder, export_toy_model
from google.protobuf import text_format


class CountingServable:
    """Wraps a real Servable and records the batch sizes it was called with."""

    def __init__(self, servable):
        self._servable, self.calls = servable, []
        self.signatures = servable.signatures

    def run(self, sig, inputs):
        self.calls.append(len(next(iter(inputs.values()))))
        return self._servable.run(sig, inputs)


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    return Servable("toy", 1, export_toy_model(base, "toy", 1))


def run_concurrently(scheduler, servable, sig_name, batches):
    sig = servable.signatures[sig_name]
    results, barrier = [None] * len(batches), threading.Barrier(len(batches))

    def go(i):
        barrier.wait()
        try:
            results[i] = scheduler.run(servable, sig, batches[i], timeout=10)
        except errors.ServingError as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_merge_and_route_back(servable):
    counting = CountingServable(servable)
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=32, batch_timeout_micros=200_000, num_batch_threads=1))
    rng = np.random.default_rng(0)
    batches = [{"images": rng.integers(0, 256, (n, 8, 8, 1)).astype(np.float32)} for n in (1, 3, 2, 5, 4, 1)]
    try:
        results = run_concurrently(scheduler, counting, "serving_default", batches)
    finally:
        scheduler.stop()
    for batch, result in zip(batches, results):
        np.testing.assert_allclose(result["embedding"], ToyEncoder(seed=1).numpy_embed(batch["images"]), atol=1e-5)
    assert len(counting.calls) < len(batches) and sum(counting.calls) == 16


def test_padding_to_allowed_sizes_and_splitting_large_requests(servable):
    counting = CountingServable(servable)
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=8, batch_timeout_micros=0, allowed_batch_sizes=(4, 8)))
    images = np.random.default_rng(1).integers(0, 256, (19, 8, 8, 1)).astype(np.float32)
    sig = servable.signatures["serving_default"]
    try:
        out = scheduler.run(counting, sig, {"images": images})["embedding"]
        small = scheduler.run(counting, sig, {"images": images[:3]})["embedding"]
    finally:
        scheduler.stop()
    np.testing.assert_allclose(out, ToyEncoder(seed=1).numpy_embed(images), atol=1e-5)
    np.testing.assert_allclose(small, ToyEncoder(seed=1).numpy_embed(images[:3]), atol=1e-5)
    assert sorted(counting.calls) == [4, 4, 8, 8]  # 19 -> 8 + 8 + 3 (padded to 4); 3 -> 4


def test_one_corrupt_request_fails_alone(servable):
    from serving.testing import encode_png
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=16, batch_timeout_micros=200_000, num_batch_threads=1))
    good = np.array([encode_png(np.zeros((8, 8, 1), np.uint8))], dtype=object)
    batches = [{"image_bytes": good}, {"image_bytes": np.array([b"junk"], dtype=object)}, {"image_bytes": good}]
    try:
        results = run_concurrently(scheduler, servable, "embed_bytes", batches)
    finally:
        scheduler.stop()
    assert isinstance(results[1], errors.ServingError) and results[1].code == "INVALID_ARGUMENT"
    assert results[0]["embedding"].shape == (1, 4) and results[2]["embedding"].shape == (1, 4)


def test_full_queue_answers_unavailable(servable):
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=2, batch_timeout_micros=500_000,
                                               max_enqueued_batches=1, num_batch_threads=1))
    one = {"images": np.zeros((2, 8, 8, 1), np.float32)}
    try:
        results = run_concurrently(scheduler, servable, "serving_default", [one] * 6)
    finally:
        scheduler.stop()
    codes = [r.code for r in results if isinstance(r, errors.ServingError)]
    assert codes and set(codes) == {"UNAVAILABLE"}
    assert any(isinstance(r, dict) for r in results)


def test_an_unloaded_servables_queue_is_forgotten_once_drained(servable):
    """A version unloaded while its requests wait is served to the end, then its queue (and the
    model it holds) is dropped."""
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=64, batch_timeout_micros=300_000, num_batch_threads=1))
    images = {"images": np.zeros((2, 8, 8, 1), np.float32)}
    results = []
    try:
        caller = threading.Thread(target=lambda: results.append(
            scheduler.run(servable, servable.signatures["serving_default"], images, timeout=10)))
        caller.start()
        while not scheduler._queues:  # the request is queued, waiting for the batch timeout
            pass
        scheduler.remove(servable)
        assert scheduler._queues  # still queued: not dropped
        caller.join()
        with scheduler._cond:
            scheduler._pick_ready()
        assert results and results[0]["embedding"].shape[0] == 2 and not scheduler._queues
    finally:
        scheduler.stop()


def test_options_from_batching_parameters_text_proto():
    params = text_format.Parse("""
        max_batch_size { value: 64 } batch_timeout_micros { value: 500 }
        num_batch_threads { value: 3 } max_enqueued_batches { value: 7 }
        allowed_batch_sizes: 16 allowed_batch_sizes: 64""", BatchingParameters())
    options = BatchingOptions.from_proto(params)
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads,
            options.max_enqueued_batches, options.allowed_batch_sizes) == (64, 500, 3, 7, (16, 64))
    with pytest.raises(ValueError, match="allowed_batch_sizes"):
        BatchingOptions(max_batch_size=8, allowed_batch_sizes=(4,))
