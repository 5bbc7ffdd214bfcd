"""Decoding workers: images in, uint8 crops (and the sha256 of each image's bytes) out, in order.

Workers are started fresh (`spawn`), so they import only numpy and PIL, inherit no open file
(never the parent's lock), and ask the kernel to kill them when their parent dies
(PR_SET_PDEATHSIG): a killed `extract` leaves no worker behind. At most `2 x workers` batches are
in flight, so memory stays flat however large the dataset and however slow the model.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlfeat import images
from tlfeat.errors import TlfeatError
from tlfeat.preprocess import Preprocessing

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


@dataclass
class Decoded:
    crops: np.ndarray  # uint8 (n, 3, crop, crop); zeros for a skipped image
    errors: list[str]  # "" or why the image was skipped
    digests: np.ndarray  # uint8 (n, 32): sha256 of each image's bytes (zeros when unreadable)


def decode_batch(items: list[images.Item], prep: Preprocessing, skip: bool) -> Decoded:
    """Read, hash, decode and resize each item; with `skip`, a bad image is recorded instead of raised."""
    n, size = len(items), prep.crop_size
    crops = np.zeros((n, 3, size, size), dtype=np.uint8)
    digests = np.zeros((n, 32), dtype=np.uint8)
    errors = [""] * n
    for i, item in enumerate(items):
        try:
            content, name = images.read(item)
            digests[i] = np.frombuffer(images.content_digest(content), dtype=np.uint8)
            crops[i] = prep.crop_of(content, name)
        except TlfeatError as exc:
            if not skip:
                raise
            errors[i] = str(exc)
    return Decoded(crops, errors, digests)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: killed with the parent, deaf to Ctrl-C (the parent handles it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def worker_died() -> TlfeatError:
    return TlfeatError(
        "a decoding worker died (killed by the system, out of memory?); finished blocks are kept: "
        "run the same command again, with --workers 0 to decode in the main process"
    )


class DecodePool:
    """An ordered map of `decode_batch` over batches of items, in `workers` processes (0: inline).

    A worker that dies (killed by the system, a crash inside a decoder) stops the run with one line
    instead of leaving it waiting for a result that never comes.
    """

    def __init__(self, prep: Preprocessing, workers: int, skip: bool) -> None:
        self.prep, self.workers, self.skip = prep, workers, skip
        self._pool: Any = None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
            )

    def map(self, batches: Iterable[list[images.Item]]) -> Iterator[Decoded]:
        if self._pool is None:
            for items in batches:
                yield decode_batch(items, self.prep, self.skip)
            return
        from concurrent.futures.process import BrokenProcessPool

        pending: deque[Any] = deque()
        ahead = 2 * self.workers
        try:
            for items in batches:
                pending.append(self._pool.submit(decode_batch, items, self.prep, self.skip))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as exc:
            raise worker_died() from exc

    def submit(self, items: list[images.Item]) -> Future[Decoded]:
        """One batch decoded by the workers in the background (at once, here, without workers);
        read it with `result`."""
        if self._pool is not None:
            from concurrent.futures.process import BrokenProcessPool

            try:
                return self._pool.submit(decode_batch, items, self.prep, self.skip)
            except BrokenProcessPool as exc:
                raise worker_died() from exc
        done: Future[Decoded] = Future()
        try:
            done.set_result(decode_batch(items, self.prep, self.skip))
        except Exception as exc:  # noqa: BLE001 - raised again by `result`, like a worker's
            done.set_exception(exc)
        return done

    @staticmethod
    def result(future: Future[Decoded]) -> Decoded:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise worker_died() from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
