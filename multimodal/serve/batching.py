"""A micro-batcher: the queries that arrive while the model is busy are answered together, as one batch.

Requests `submit` their query and wait; one task takes whatever is queued (up to `max_batch`) as soon as the
previous batch is done and runs `run(batch)` on one worker thread (the model is called from one thread at a
time, and the event loop stays free to accept requests meanwhile). There is no timer: a lone query goes at
once, and under load the batches grow by themselves to what arrived during the last one (as Triton's dynamic
batcher does with a zero queue delay).
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class MicroBatcher:
    def __init__(self, run: Callable[[list], list], max_batch: int = 64):
        self.run, self.max_batch = run, max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="multimodal-serve")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, item):
        """`run`'s answer for `item`, computed in a batch with the items submitted at about the same time."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, future) for item, future in batch if not future.done()]  # a client gone: cancelled
            if not batch:
                continue
            try:
                answers = await loop.run_in_executor(self._pool, self.run, [item for item, _ in batch])
            except Exception as exc:  # a bug: each waiting request fails with it, the batcher goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)
