"""Running prepare's per-image work: in this process, or in a pool of forked workers that survives crashes.

A worker killed by a decoder crash or the OOM killer costs only the image that killed it;
Pillow's pixel limit and block cache are set the same way in the parent and the workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from PIL import Image

from zturbo.data.prepare_image import process_file


def run_tasks(
    tasks: list[tuple],
    workers: int,
    max_pixels: int,
    on_result: Callable[[dict[str, Any]], None],
    started: Callable[[], Any] | None = None,
    fn: Callable[..., dict[str, Any]] = process_file,
) -> None:
    """Run ``fn(*task)`` for every task, in a process pool when ``workers > 1``.

    A worker that dies (a decoder crash, the OOM killer) does not stop the run: the
    tasks that were in flight are retried one at a time, and the one that kills its
    worker again is reported as skipped with reason "worker-crash".
    """
    if workers <= 1 or len(tasks) <= 1:
        with _pillow_limits(max_pixels):
            if started is not None:
                started()
            for task in tasks:
                on_result(fn(*task))
        return

    queue = deque(tasks)
    suspects: list[tuple] = []
    announced = False
    while queue or suspects:
        if suspects:
            task = suspects.pop(0)
            with _executor(1, max_pixels) as ex:
                try:
                    on_result(ex.submit(fn, *task).result())
                except BrokenProcessPool:
                    on_result(_crash_record(task))
            continue
        with _executor(min(workers, len(queue)), max_pixels) as ex:
            pending: dict = {}
            broken = False
            while (queue or pending) and not broken:
                try:
                    while queue and len(pending) < 2 * workers:
                        task = queue.popleft()
                        pending[ex.submit(fn, *task)] = task
                except BrokenProcessPool:
                    queue.appendleft(task)
                    break
                if not announced and started is not None:
                    started()  # after the workers are forked, so no other thread exists at fork time
                    announced = True
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    exc = future.exception()
                    if exc is None:
                        on_result(future.result())
                        del pending[future]
                    elif isinstance(exc, BrokenProcessPool):
                        broken = True
                    else:
                        raise exc
            # A worker died: what finished is kept, the rest is retried one task at a time.
            for future, task in pending.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    on_result(future.result())
                else:
                    suspects.append(task)


def _crash_record(task: tuple) -> dict[str, Any]:
    return {"source": task[1], "status": "skipped", "reason": "worker-crash", "detail": "the decoder crashed"}


@contextlib.contextmanager
def _executor(workers: int, max_pixels: int) -> Iterator[ProcessPoolExecutor]:
    ex = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_mp_context(),
        initializer=_worker_init,
        initargs=(os.getpid(), max_pixels),
    )
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _mp_context():
    import multiprocessing as mp

    # fork: workers start in milliseconds and share the already-imported modules; the
    # alternatives re-import torch (seconds per worker). Not safe on macOS.
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _worker_init(parent_pid: int, max_pixels: int) -> None:
    # Ctrl-C goes to the parent, which finishes in-flight images and stops cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_pillow_limits(max_pixels)

    # A forked worker keeps the task pipe open itself, so it would wait forever if the parent
    # were killed: leave as soon as the parent is gone.
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


# Pillow frees image memory blocks (16 MiB each) by default, so every image faults its buffers
# in again; keeping a few cached cuts prepare's CPU time per image by about a fifth.
_PILLOW_BLOCKS_KEPT = 4


def _set_pillow_limits(max_pixels: int) -> None:
    # Our own check (check_pixels) refuses bombs from the header; Pillow's limit and warning
    # follow the configured value so neither fires first with a different threshold.
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    Image.core.set_blocks_max(max(Image.core.get_blocks_max(), _PILLOW_BLOCKS_KEPT))


@contextlib.contextmanager
def _pillow_limits(max_pixels: int) -> Iterator[None]:
    saved_pixels, saved_blocks = Image.MAX_IMAGE_PIXELS, Image.core.get_blocks_max()
    with warnings.catch_warnings():
        _set_pillow_limits(max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved_pixels
            Image.core.set_blocks_max(saved_blocks)
