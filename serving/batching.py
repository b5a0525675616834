"""Server-side batching: concurrent requests to one signature merged into one model call.

A model call costs much the same for 1 row as for 32 on CPU (fixed dispatch cost, better
vectorization), so merging concurrent requests raises throughput. Semantics follow TF
Serving's BatchingParameters: a batch closes when it holds `max_batch_size` rows or its oldest
request has waited `batch_timeout_micros`; `num_batch_threads` batches run at once; at most
`max_enqueued_batches` batches' worth of rows may wait (beyond that: UNAVAILABLE, so callers
back off); batches are padded up to the next `allowed_batch_sizes` entry; a request larger
than `max_batch_size` is split and its pieces re-joined (enable_large_batch_splitting).
If a merged batch fails, each request in it is re-run alone, so one bad request (say a
corrupt JPEG) fails only itself.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
import weakref

import numpy as np

from serving import errors
from serving.servable import Servable, Signature


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    num_batch_threads: int = os.cpu_count() or 2
    max_enqueued_batches: int = 100
    allowed_batch_sizes: tuple[int, ...] = ()
    enable_large_batch_splitting: bool = True

    def __post_init__(self):
        if self.max_batch_size < 1 or self.num_batch_threads < 1 or self.max_enqueued_batches < 1:
            raise ValueError("max_batch_size, num_batch_threads and max_enqueued_batches must be >= 1")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must be >= 0")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError("allowed_batch_sizes must increase strictly and end with max_batch_size "
                             f"({self.max_batch_size}); got {sizes}")

    @classmethod
    def from_proto(cls, params) -> "BatchingOptions":
        """From a tensorflow.serving.BatchingParameters message (unset fields keep defaults)."""
        kwargs = {}
        for field in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
            if params.HasField(field):
                kwargs[field] = getattr(params, field).value
        if params.HasField("enable_large_batch_splitting"):
            kwargs["enable_large_batch_splitting"] = params.enable_large_batch_splitting.value
        if params.allowed_batch_sizes:
            kwargs["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
        return cls(**kwargs)


class _Task:
    __slots__ = ("inputs", "rows", "shape_key", "enqueued", "done", "result", "error", "cancelled")

    def __init__(self, inputs: dict[str, np.ndarray]):
        self.inputs = inputs
        self.rows = next(iter(inputs.values())).shape[0]
        # Only requests whose non-batch dimensions agree can be concatenated.
        self.shape_key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()))
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result = self.error = None
        self.cancelled = False


class _Queue:
    def __init__(self, servable: Servable, sig: Signature):
        self.servable, self.sig = servable, sig
        self.tasks: collections.deque[_Task] = collections.deque()
        self.rows = 0
        self.retired = False  # its servable was unloaded: forgotten once drained


class BatchScheduler:
    """Shared batch threads over one queue per (servable version, signature).

    Args:
      options: BatchingOptions.
      on_batch: optional callback(servable, signature name, batch rows) for metrics.
    """

    def __init__(self, options: BatchingOptions, on_batch=None):
        self.options = options
        self._on_batch = on_batch
        self._queues: dict[tuple[int, str], _Queue] = {}
        self._unloaded = weakref.WeakSet()  # servables removed while requests may still hold them
        self._cond = threading.Condition()
        self._stopped = False
        self._next = 0
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for t in self._threads:
            t.start()

    def stop(self):
        with self._cond:
            self._stopped = True
            for q in self._queues.values():
                for task in q.tasks:
                    task.error = errors.unavailable("Server is shutting down.")
                    task.done.set()
                q.tasks.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def remove(self, servable: Servable):
        """Forgets the queues of an unloaded servable: now if empty, else once drained (a queue
        kept would hold the unloaded model in memory)."""
        with self._cond:
            self._unloaded.add(servable)
            for queue in self._queues.values():
                if queue.servable is servable:
                    queue.retired = True
            self._forget_drained()

    def _forget_drained(self):
        for key in [k for k, q in self._queues.items() if q.retired and not q.tasks]:
            del self._queues[key]

    def run(self, servable: Servable, sig: Signature, inputs: dict[str, np.ndarray],
            timeout: float | None = None) -> dict[str, np.ndarray]:
        """Runs checked inputs through a batch; blocks until done, error or timeout."""
        if not sig.batchable:
            return servable.run(sig, inputs)
        rows = next(iter(inputs.values())).shape[0]
        limit = self.options.max_batch_size
        if rows > limit:
            if not self.options.enable_large_batch_splitting:
                raise errors.invalid_argument(f"Task size {rows} is larger than maximum input batch size {limit}")
            parts = [self._submit(servable, sig, {k: v[i:i + limit] for k, v in inputs.items()})
                     for i in range(0, rows, limit)]
        else:
            parts = [self._submit(servable, sig, inputs)]
        deadline = None if timeout is None else time.monotonic() + timeout
        results = [self._wait(t, deadline) for t in parts]
        if len(results) == 1:
            return results[0]
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

    def _submit(self, servable, sig, inputs) -> _Task:
        task = _Task(inputs)
        with self._cond:
            if self._stopped:
                raise errors.unavailable("Server is shutting down.")
            key = (id(servable), sig.name)
            queue = self._queues.get(key)
            if queue is None or queue.servable is not servable:
                queue = self._queues[key] = _Queue(servable, sig)
                # A request that resolved its servable just before the unload still runs on it;
                # the queue made for it is then forgotten once drained, like the unloaded ones.
                queue.retired = servable in self._unloaded
            if queue.rows + task.rows > self.options.max_enqueued_batches * self.options.max_batch_size:
                raise errors.unavailable("The batch scheduling queue to which this task was submitted is full")
            queue.tasks.append(task)
            queue.rows += task.rows
            self._cond.notify()
        return task

    def _wait(self, task: _Task, deadline) -> dict[str, np.ndarray]:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not task.done.wait(remaining):
            task.cancelled = True  # a batch thread that has not taken it yet will skip it
            raise errors.deadline_exceeded("Deadline exceeded while waiting for the batch to run.")
        if task.error is not None:
            raise task.error
        return task.result

    # -- batch threads ---------------------------------------------------------------------
    def _work(self):
        while True:
            with self._cond:
                picked = None
                while picked is None:
                    if self._stopped:
                        return
                    picked, wait = self._pick_ready()
                    if picked is None:
                        self._cond.wait(wait)
                queue, batch = picked
            self._execute(queue, batch)

    def _pick_ready(self):
        """(queue, tasks) of a batch that is full or timed out, else (None, seconds to wait)."""
        now, wait = time.monotonic(), None
        timeout = self.options.batch_timeout_micros / 1e6
        self._forget_drained()
        queues = list(self._queues.values())
        for i in range(len(queues)):
            queue = queues[(self._next + i) % len(queues)]
            while queue.tasks and queue.tasks[0].cancelled:
                queue.rows -= queue.tasks.popleft().rows
            if not queue.tasks:
                continue
            age = now - queue.tasks[0].enqueued
            if queue.rows >= self.options.max_batch_size or age >= timeout:
                self._next = (self._next + i + 1) % max(1, len(queues))
                return (queue, self._take(queue)), None
            wait = timeout - age if wait is None else min(wait, timeout - age)
        return None, wait

    def _take(self, queue: _Queue) -> list[_Task]:
        """Removes up to max_batch_size rows of tasks shaped like the oldest one."""
        first = queue.tasks[0]
        batch, rows, rest = [], 0, collections.deque()
        for task in queue.tasks:
            if task.cancelled:
                queue.rows -= task.rows
            elif task.shape_key == first.shape_key and rows + task.rows <= self.options.max_batch_size:
                batch.append(task)
                rows += task.rows
                queue.rows -= task.rows
            else:
                rest.append(task)
        queue.tasks = rest
        return batch

    def _padded_size(self, rows: int) -> int:
        for size in self.options.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows

    def _execute(self, queue: _Queue, batch: list[_Task]):
        servable, sig = queue.servable, queue.sig
        rows = sum(t.rows for t in batch)
        size = self._padded_size(rows)
        try:
            inputs = {}
            for key in batch[0].inputs:
                parts = [t.inputs[key] for t in batch]
                if size > rows:  # pad with copies of the first row; the padding is sliced off below
                    parts.append(np.repeat(parts[0][:1], size - rows, axis=0))
                inputs[key] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            outputs = servable.run(sig, inputs)
            bad = [k for k, v in outputs.items() if np.ndim(v) == 0 or v.shape[0] != size]
            if bad:
                raise errors.internal(f"Outputs {bad} do not have the batch size {size} as dimension 0; "
                                      "this signature cannot be batched.")
            if self._on_batch:
                self._on_batch(servable, sig.name, size)
            start = 0
            for task in batch:
                task.result = {k: v[start:start + task.rows] for k, v in outputs.items()}
                start += task.rows
                task.done.set()
        except errors.ServingError as exc:
            for task in batch:
                if len(batch) == 1:
                    task.error = exc
                else:  # isolate the culprit: each request alone
                    try:
                        task.result = servable.run(sig, task.inputs)
                    except errors.ServingError as own:
                        task.error = own
                task.done.set()
        except Exception as exc:  # noqa: BLE001  (a batch thread must never die)
            for task in batch:
                task.error = errors.from_exception(exc)
                task.done.set()
