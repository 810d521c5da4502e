"""`Batcher`: concurrent calls of a stage coalesced into one batched call, with no waiting window.

While a batch runs (in a worker thread), new items queue; when it ends, everything queued (up to `max_size`)
forms the next batch. Idle, an item runs alone at once; under load, batches grow with the load. `fn` takes the
items and returns one result per item; an exception for one item is returned as that item's result (the caller
raises it), so a bad item fails alone.

Deliberately not `ray.serve.batch`: the stages also run in process (the benchmarks' in-process pipeline, the
service tests), and `serve.batch` only runs inside a Serve replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R]], max_size: int = 32):
        self.fn = fn
        self.max_size = max_size
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.max_batch = 0  # the largest batch so far (observability)

    async def submit(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_size], self._queue[self.max_size :]
            self.max_batch = max(self.max_batch, len(batch))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as e:  # a failure of the whole call fails its batch; the worker goes on
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def each_alone_on_error(fn: Callable[[list[T]], list[R]]) -> Callable[[list[T]], list[R | Exception]]:
    """`fn` over a batch; when the batch has an input error (ValueError: the errors callers cause), `fn` again
    item by item, so only the bad items fail (with their error as their result)."""

    def run(items: list[T]) -> list[R | Exception]:
        try:
            return fn(items)
        except ValueError as e:
            if len(items) == 1:
                return [e]
        out: list[R | Exception] = []
        for item in items:
            try:
                out.extend(fn([item]))
            except ValueError as e:
                out.append(e)
        return out

    return run


def result_of(value: R | Exception) -> R:
    """A batched call's result for one item: the item's own error is raised here, in its caller."""
    if isinstance(value, Exception):
        raise value
    return value
