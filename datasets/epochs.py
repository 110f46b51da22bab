"""FFCV's per-epoch machinery, patched for the loaders in :mod:`ssal_datasets.loader`:

    StatelessQuasiRandom(loader)   the quasi-random sample order, reproducible per epoch and distributed
    reuse_batch_memory(graph)      keep FFCV's ring of batch buffers across epochs
    wait_for_last_epoch()          the GPU done with the last epoch's buffers before the next epoch writes them
    EpochIter(ffcv_iter, threads, convert)
                                   one epoch's iterator: converted batches, a dead producer thread
                                   reported, the thread stopped cleanly when abandoned or at exit

Kept apart from ``loader.py`` because these replace or wrap FFCV internals (its traversal order,
its memory allocation, its epoch thread) and hold process-wide state (the live iterators, the
thread exception hook, the exit hook), while ``loader.py`` only configures FFCV's public Loader.
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref

import numpy as np
import torch

import ssal_datasets.decoders  # noqa: F401 - imports FFCV first, keeping torch's thread count
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA as _FFCV_IS_CUDA
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.traversal_order.base import TraversalOrder
from ffcv.traversal_order.quasi_random import QuasiRandom, generate_order_inner


class StatelessQuasiRandom(QuasiRandom):
    """FFCV's QuasiRandom order (samples drawn from a window of ``2 x batch_size`` pages at a time,
    so that with ``os_cache=False`` a process holds that window, not the beton), with two changes:

    * FFCV shuffles its page table in place, so epoch e's order depended on the epochs drawn before
      it (``set_epoch`` could not reproduce it); this one shuffles a copy.
    * Distributed: FFCV 1.0.2 refuses it. Every rank draws the same global order (same seed and
      epoch), padded cyclically to a multiple of the world size as torch's DistributedSampler pads,
      and takes its own contiguous block of it: the ranks' shares are disjoint, and each rank reads
      its own pages (all ranks together read the beton about once per epoch, where ``random`` makes
      every rank read nearly every page)."""

    def __init__(self, loader: Loader):
        TraversalOrder.__init__(self, loader)  # not QuasiRandom's: it raises when distributed
        self.page_to_samples = loader.memory_manager.page_to_samples
        if not self.page_to_samples:
            raise ValueError("quasi_random: the beton has no data pages")
        self.prepare_data_structures()
        if self.distributed:
            import torch.distributed as dist
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def sample_order(self, epoch: int):
        result = np.zeros(len(self.indices), dtype=np.int64)
        generate_order_inner(self.seed * 912300 + epoch, self.page_to_samples_array.copy(), self.page_sizes,
                             result, 2 * self.loader.batch_size)
        if not self.distributed:
            return result
        per_rank = -(-len(result) // self.world_size)
        padded = np.resize(result, per_rank * self.world_size)  # repeats the order's start, as DistributedSampler
        return padded[self.rank * per_rank:(self.rank + 1) * per_rank]


def reuse_batch_memory(graph) -> None:
    """FFCV allocates its ring of batch buffers afresh every epoch (at res 160, batch 64 and 500 px
    images: 340 MB, most of it room for decoded JPEGs), so each epoch first-touches new pages
    (page faults and zeroing: ~10 % of the CPU loader here), and on CUDA pins them again. Keep the
    buffers while the requirements (shapes, dtypes; set_resolution changes them) stay the same.
    The host side is safe because an epoch's thread has ended before the next epoch's starts (the
    loaders' __iter__ closes the previous EpochIter first); the device side is :func:`wait_for_last_epoch`'s."""
    allocate = graph.allocate_memory
    held = {}

    def allocate_memory(batch_size, batches_ahead):
        # FFCV's EpochIterator calls this in the consumer's thread, before it starts its producer thread:
        # the one point per epoch where no copy of the new epoch has been queued yet
        if held:
            wait_for_last_epoch()
        key = (batch_size, batches_ahead, repr(graph.collect_requirements()[0]))
        if key not in held:
            held.clear()  # drop the old buffers before the new ones are allocated
            held[key] = allocate(batch_size, batches_ahead)
        return held[key]

    graph.allocate_memory = allocate_memory


def wait_for_last_epoch() -> None:
    """Before an epoch's first copy into the kept buffers: wait until the GPU is done with the last epoch.

    FFCV guards a ring slot with an event recorded on the consumer stream, but starts every epoch with
    no events (``EpochIterator.run``: ``events = [None, ...]``) and new copy streams. So epoch e+1's first
    ``batches_ahead + 2`` copies would not wait for the consumer stream, which may still be reading the
    same slots for epoch e's last steps (the kernels queued ahead of the GPU); and a copy that epoch e
    queued for a batch nobody took (an epoch cut short) is ordered with no stream of epoch e+1. One device
    synchronisation per epoch covers both; it costs the GPU's queue of a few steps once an epoch."""
    if _FFCV_IS_CUDA and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ iterator plumbing
_LIVE_ITERATORS: "weakref.WeakSet[EpochIter]" = weakref.WeakSet()
_THREAD_ERRORS: dict = {}  # thread ident -> exception that killed an FFCV epoch thread
_previous_excepthook = threading.excepthook


def _excepthook(args):
    if isinstance(args.thread, EpochIterator):
        _THREAD_ERRORS[args.thread.ident] = args.exc_value
    _previous_excepthook(args)


threading.excepthook = _excepthook


def _shutdown_ffcv_iterator(it) -> None:
    """Stop an FFCV EpochIterator thread cleanly (gotcha: abandoned iterators crash at exit).

    Its thread only notices ``terminate_event`` while its output queue is full, and it blocks
    for ever on the final ``put(None)`` if the queue is full then: so set the event, and drain
    the queue while joining."""
    try:
        it.terminate_event.set()
        while it.is_alive():
            it.join(timeout=0.05)
            try:
                while True:
                    it.output_queue.get_nowait()
            except queue.Empty:
                pass
        it.close()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass


@atexit.register
def _close_all() -> None:
    for it in list(_LIVE_ITERATORS):
        it.close()


class EpochIter:
    """One epoch: wraps FFCV's EpochIterator, converts batches (``convert``: the owning loader's
    batch -> what it yields), restores torch's thread count."""

    def __init__(self, ffcv_iter, threads: int, convert):
        self._convert = convert
        self._it = ffcv_iter
        self._threads = threads
        self._first = True
        self._done = False
        _LIVE_ITERATORS.add(self)

    def __iter__(self):
        return self

    def _get(self):
        """FFCV's EpochIterator.__next__, but never waits for ever on a dead producer thread."""
        it = self._it
        while True:
            try:
                result = it.output_queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not it.is_alive():
                    try:
                        result = it.output_queue.get_nowait()
                        break
                    except queue.Empty:
                        err = _THREAD_ERRORS.pop(it.ident, None)
                        raise RuntimeError(f"FFCV loader thread died: {err!r}" if err else
                                           "FFCV loader thread died (see the traceback above)") from err
        if result is None:
            it.close()
            raise StopIteration
        slot, batch = result
        if _FFCV_IS_CUDA:
            it.current_stream.wait_stream(it.cuda_streams[slot])  # the H2D copy of this batch is done
        return batch

    def __next__(self):
        if self._done:
            raise StopIteration
        try:
            batch = self._get()
        except StopIteration:
            self._done = True
            _LIVE_ITERATORS.discard(self)
            torch.set_num_threads(self._threads)
            raise
        except BaseException:
            self.close()
            raise
        if self._first:  # the FFCV thread has set torch's threads to num_workers by now
            torch.set_num_threads(self._threads)
            self._first = False
        return self._convert(batch)

    def close(self) -> None:
        if not self._done:
            self._done = True
            _shutdown_ffcv_iterator(self._it)
            torch.set_num_threads(self._threads)
        _LIVE_ITERATORS.discard(self)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
