"""The DataLoader over a stream and its workers' lifecycle: workers ignore the group's signals and die with the
main process; ``stop_workers`` ends them now (SIGKILL where torch's own shutdown would wait forever)."""
from __future__ import annotations

import atexit
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from evaclip.data.streams import stream_seed


def worker_init(_worker_id: int) -> None:
    """DataLoader workers leave signals to the main process and die with it.

    SIGTERM / SIGINT sent to the whole process group (``timeout``, Slurm, Ctrl-C) must not kill the workers
    before the main process has checkpointed; and a worker must not outlive a main process killed with -9
    (Linux: the parent-death signal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BatchLoader(DataLoader):
    """A DataLoader whose workers are always stopped, whatever ends their iterator.

    Our workers ignore SIGTERM (``worker_init``), and torch's own shutdown relies on SIGTERM as its fallback:
    it asks each worker to leave (a None on its index queue), waits 5 s, then terminates the ones still
    there. A worker that missed the request (busy past the wait, or the message lost when the queue was
    closed) would poll for ever, and at interpreter exit multiprocessing would SIGTERM it and wait for it
    for ever. So every iterator's shutdown ends with SIGKILL for any worker still alive, and an exit hook
    stops whatever iterators are still referenced when the interpreter exits."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        it = _StoppingIterator(self)
        _LIVE_ITERATORS.add(it)
        return it


class _StoppingIterator(_MultiProcessingDataLoaderIter):
    def _shutdown_workers(self):
        try:
            super()._shutdown_workers()
        finally:
            _kill_left_workers(self)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _kill_left_workers(it) -> None:
    """SIGKILL the workers of ``it`` that are still alive (after torch's shutdown, or instead of it at exit)."""
    workers = [w for w in (getattr(it, "_workers", None) or []) if w.is_alive()]
    if not workers:
        return
    if getattr(it, "_worker_pids_set", False):  # stop torch's SIGCHLD check from reporting them as failures
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        _remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in workers:
        w.kill()
        w.join(timeout=10)


def stop_workers(it) -> None:
    """Stop a loader iterator's workers now (close_data; the exit hook). At exit torch's part of the shutdown
    is a no-op; ``_StoppingIterator`` then kills the workers itself."""
    if isinstance(it, _StoppingIterator):  # an iterator without workers has nothing to stop
        _LIVE_ITERATORS.discard(it)
        it._shutdown_workers()


@atexit.register  # registered after torch's exit hook, so it runs before it (atexit runs last-in first-out)
def _stop_all_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        try:
            stop_workers(it)
        except Exception:  # noqa: BLE001 - best effort at exit; never block the interpreter's shutdown
            pass


def make_loader(stream: IterableDataset, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches; workers are polled round-robin, so the batch order is deterministic.

    It gets its own generator: creating an iterator draws a base seed, which must not consume the global
    RNG (that would shift patch-dropout masks after a resume). With a batch time bound, the loader's own
    timeout backs up the workers' (a read that blocks in I/O cannot check the time itself)."""
    gen = torch.Generator().manual_seed(stream_seed(stream.spec.seed, "loader", stream.spec.rank))
    bound = stream.spec.batch_timeout_s
    return BatchLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, generator=gen,
                      persistent_workers=False, prefetch_factor=2 if workers > 0 else None,
                      worker_init_fn=worker_init if workers > 0 else None,
                      timeout=(2 * bound + 30) if workers > 0 and bound else 0)
