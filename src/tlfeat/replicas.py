"""The tensor pipeline's engine: one model replica per device, one writer, rows in order.

Each replica (a device, the network on it, a `devicepipe.Preparer`) runs in a thread of its own and
takes the next batch the shared `Fetcher` has read, whichever replica is free first. It queues the
network on a batch, prepares the next one while the device computes, then collects the first:
two batches in flight per device, so it never waits for the host. The calling thread receives
the results and yields them in batch order to the one crash-safe writer; at most `ahead` batches
are taken and not yet yielded, so memory stays flat however uneven the devices.

A replica that fails (a GPU error, out of memory) is retired: its batches go back to the others,
and the run finishes with the same bits (every replica runs the same network with the same fixed
micro-batches). A user's error (an image that cannot be decoded) stops the run at once, keeping
the finished blocks, as in the CPU engine. With one device this is simply the pipelined loop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlfeat import config, inference, progress
from tlfeat.config import ExtractConfig
from tlfeat.datasets import ImageSplit
from tlfeat.devicepipe import Fetched, Fetcher, Prepared, Preparer
from tlfeat.errors import TlfeatError, first_line
from tlfeat.pool import DecodePool
from tlfeat.preprocess import Preprocessing

log = logging.getLogger(__name__)

# (row indices, one (n, d) array per layer, errors, digests): what engine.compute writes.
Chunk = tuple[np.ndarray, list[np.ndarray], list[str], np.ndarray]

IMAGE_BYTES = 48 << 20  # device memory per image in a batch, at worst: a 12-megapixel photo decoded and resized
MAX_BATCH = 512


@dataclass
class Replica:
    """One device and the network on it."""

    name: str
    runner: Any  # inference.TorchRunner (or any runner taking float32 NCHW numpy arrays)
    preparer: Preparer
    batches: int = 0  # batches it computed (for the log and the tests)

    def launch(self, prepared: Prepared) -> Any:
        """Queue the network on a prepared batch; returns what `result()` is read from."""
        if not hasattr(self.runner, "start"):  # ONNX Runtime: on the CPU, synchronous
            return _Done(self.runner(prepared.x.numpy()))
        if prepared.ready is not None:
            import torch

            stream = torch.cuda.current_stream(prepared.x.device)
            stream.wait_event(prepared.ready)
            prepared.x.record_stream(stream)  # the batch was made on the preparer's stream
        return self.runner.start(prepared.x)


class _Done:
    def __init__(self, outputs: list[np.ndarray]) -> None:
        self.outputs = outputs

    def result(self) -> list[np.ndarray]:
        return self.outputs


def batch_for_memory(free_bytes: int, micro: int = inference.GPU_MICRO_BATCH) -> int:
    """A batch that fits a quarter of a device's free memory, in whole micro-batches, at most MAX_BATCH."""
    fits = free_bytes // 4 // IMAGE_BYTES
    return int(max(micro, min(MAX_BATCH, fits // micro * micro)))


def default_batch(devices: list[str]) -> int:
    """64 on the CPU (measured); on GPUs, what fits the one with the least free memory."""
    if not all(d.startswith("cuda") for d in devices):
        return 64
    import torch

    return min(batch_for_memory(torch.cuda.mem_get_info(torch.device(d))[0]) for d in devices)


def default_readers() -> int:
    """Threads reading and hashing files ahead of the device: I/O and sha256 release the GIL."""
    return max(2, min(16, config.cores()))


class Board:
    """Where replicas take batches and leave results; the caller reads results in batch order."""

    def __init__(self, source: Iterable[Fetched], n_batches: int, replicas: int, ahead: int) -> None:
        self.source = iter(source)
        self.n_batches, self.alive, self.running, self.ahead = n_batches, replicas, replicas, ahead
        self.cond = threading.Condition()
        self.read_lock = threading.Lock()  # the source is a generator: one reader at a time
        self.taken = 0  # batches read from the source and not yet yielded
        self.completed = 0
        self.waiting = 0  # idle replicas waiting for a failed one's batches
        self.retry: deque[Fetched] = deque()
        self.results: dict[int, tuple[Fetched, list[np.ndarray]]] = {}
        self.exhausted = False
        self.error: BaseException | None = None
        self.stop = False

    def take(self, idle: bool) -> Fetched | None:
        """The next batch to compute (a retired replica's first). None: finish what you hold (`idle`
        false), or there is nothing left to do. An idle replica waits while others still compute,
        in case one of them fails and leaves its batches."""
        while True:
            with self.cond:
                while True:
                    if self.stop or self.error is not None:
                        return None
                    if self.retry:
                        return self.retry.popleft()
                    if self.exhausted:
                        # The last replica to go idle ends the wait: nobody holds a batch any more.
                        if not idle or self.completed >= self.n_batches or self.waiting + 1 >= self.running:
                            return None
                        self.waiting += 1
                        self.cond.wait()
                        self.waiting -= 1
                        continue
                    if self.taken < self.ahead:
                        self.taken += 1
                        break
                    if not idle:  # the batch it holds may be the one the caller waits for
                        return None
                    self.cond.wait()
            try:
                with self.read_lock:
                    fetched = next(self.source, None)
            except BaseException as exc:  # noqa: BLE001 - a reader's error stops the run with it
                self.fail(exc)
                return None
            if fetched is not None:
                return fetched
            with self.cond:
                self.exhausted, self.taken = True, self.taken - 1
                self.cond.notify_all()

    def done(self, fetched: Fetched, outputs: list[np.ndarray]) -> None:
        with self.cond:
            self.results[fetched.index] = (fetched, outputs)
            self.completed += 1
            self.cond.notify_all()

    def retire(self, name: str, jobs: list[Fetched], exc: BaseException) -> None:
        """A replica failed: its batches go to the others; with none left, the run fails."""
        with self.cond:
            self.alive -= 1
            if self.alive > 0:
                log.warning(
                    "replica %s failed (%s); its batches go to the %d others", name, first_line(exc), self.alive
                )
                self.retry.extend(jobs)
            elif self.error is None:
                self.error = exc
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def leave(self) -> None:
        """A replica's thread ends (done, retired or stopped)."""
        with self.cond:
            self.running -= 1
            self.cond.notify_all()

    def ordered(self) -> Iterator[tuple[Fetched, list[np.ndarray]]]:
        for index in range(self.n_batches):
            with self.cond:
                while index not in self.results and self.error is None and self.running > 0:
                    self.cond.wait()
                if index not in self.results:
                    raise self.error or TlfeatError(
                        f"internal: every replica stopped and batch {index} was not computed"
                    )
                result = self.results.pop(index)
                self.taken -= 1
                self.cond.notify_all()
            yield result

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()


def _work(board: Board, replica: Replica) -> None:
    """A replica's loop: queue batch k+1 on the device before collecting batch k."""
    pending: tuple[Fetched, Any] | None = None
    current: Fetched | None = None
    try:
        with _on(replica.preparer.device):
            while True:
                current = board.take(idle=pending is None)
                if current is not None:
                    handle = replica.launch(replica.preparer(current))
                elif pending is None:
                    return
                if pending is not None:
                    board.done(pending[0], pending[1].result())
                    replica.batches += 1
                pending, current = ((current, handle) if current is not None else None), None
    except TlfeatError as exc:  # the user's images: the same error on any device
        board.fail(exc)
    except Exception as exc:  # noqa: BLE001 - this device failed: the others take its batches
        jobs = [job for job in (pending[0] if pending else None, current) if job is not None]
        board.retire(replica.name, jobs, _out_of_memory(replica.name, exc) or exc)
    except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
        board.fail(exc)
    finally:
        board.leave()


def _on(device: Any) -> Any:
    """Make `device` the current CUDA device of this thread (nothing to do on the CPU)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(device)


def _out_of_memory(name: str, exc: BaseException) -> TlfeatError | None:
    if "out of memory" not in str(exc).lower():
        return None
    return TlfeatError(f"{name} ran out of memory ({first_line(exc)}); lower --batch-size")


def run(
    fetcher: Iterable[Fetched], n_batches: int, replicas: list[Replica], ahead: int | None = None
) -> Iterator[Chunk]:
    """Every batch of `fetcher` through the replicas; chunks yielded in batch order."""
    board = Board(fetcher, n_batches, len(replicas), ahead or 2 * len(replicas) + 2)
    threads = [threading.Thread(target=_work, args=(board, r), name=f"tlfeat-{r.name}", daemon=True) for r in replicas]
    for thread in threads:
        thread.start()
    try:
        for fetched, outputs in board.ordered():
            yield fetched.rows, outputs, fetched.errors, fetched.digests
    finally:
        board.close()
        for thread in threads:
            thread.join()
        close = getattr(board.source, "close", None)
        if close is not None:
            close()  # the reader threads stop
    log.info("batches per replica: %s", [(r.name, r.batches) for r in replicas])


# --------------------------------------------------------------------------- the engine's entry


def build(
    runner: Any, spec: inference.ModelSpec, devices: list[str], prep: Preprocessing, pool: DecodePool
) -> list[Replica]:
    """One replica per device: the loaded runner on the first, copies of its network on the others."""
    first = str(runner.device) if hasattr(runner, "start") else "cpu"  # ONNX Runtime takes host arrays
    out = [Replica(devices[0], runner, Preparer(prep, first, pool))]
    if len(devices) > 1:
        state = {k: v.cpu() for k, v in runner.extractor.state_dict().items()}
        for device in devices[1:]:
            inference.check_device(device)
            copy = inference.TorchRunner.from_state(dataclasses.replace(spec, device=device), state)
            out.append(Replica(device, copy, Preparer(prep, device, pool)))
    return out


def chunks(
    cfg: ExtractConfig,
    images: ImageSplit,
    rows: list[int],
    prep: Preprocessing,
    runner: Any,
    spec: inference.ModelSpec,
    workers: int,
) -> Iterator[Chunk]:
    """The local engine with the tensor pipeline (`--decode device`, or several devices)."""
    devices = cfg.devices()
    batch = cfg.batch_size or default_batch(devices)
    batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    bar = progress.bar(cfg.progress, len(rows), f"{cfg.model} {images.split} ({', '.join(devices)})")
    try:
        with DecodePool(prep, workers, skip=cfg.on_error == "skip") as pool:
            # Parquet rows are read a row group at a time, and two groups are kept: two readers share them.
            readers = min(2, default_readers()) if images.kind == "parquet" else default_readers()
            fetcher = Fetcher(images, batches, pool, cfg.resolved_decode() == "device", readers)
            for chunk in run(fetcher, len(batches), build(runner, spec, devices, prep, pool)):
                for err in chunk[2]:
                    if err:
                        log.warning("skipped: %s", err)
                bar.update(len(chunk[0]))
                yield chunk
    finally:
        bar.close()
