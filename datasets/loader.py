"""FFCV loaders for training and evaluation.

    create_train_loader(beton, *, batch_size, num_workers, resolution, device, ...) -> TrainLoader
    create_val_loader(beton, *, batch_size, num_workers, resolution, device, ...)   -> ValLoader
    resolution_for_epoch(epoch, *, min_res, max_res, start_ramp, end_ramp, step=32) -> int

``for images, labels in loader`` yields float images ``(N, 3, H, W)`` normalised with the
ImageNet mean/std (channels-last memory format when asked) and int64 labels ``(N,)``, both on
``device``. ``loader.set_epoch(e)`` fixes the epoch of the next iteration (ordering *and*
augmentation); ``TrainLoader.set_resolution(r)`` changes the random-resized-crop size from the
next epoch on (progressive resizing, no re-JIT).

Reproducibility. FFCV's own RandomResizedCrop / RandomHorizontalFlip draw from numba's
per-thread RNGs, which nobody seeds (and which thread decodes which sample is up to the
scheduler). The train pipeline here uses drop-in replacements that derive every random number
from a counter-based hash of ``(seed, epoch, sample index)``: the same seed and epoch give
the same batches, images included, whatever ``num_workers`` or the thread scheduling. The
epoch reaches the compiled pipeline through a small int64 array read by address, so changing
it does not recompile anything. Colour jitter (``color_jitter=s``: torchvision's
``ColorJitter(s, s, s)``, brightness / contrast / saturation in a random order, applied to the
resized crop, before normalisation) draws its factors from the same hash, stream 3
(:func:`jitter_params`), so it is reproducible in the same way.

Lifetime of a batch. On CPU the images of a batch are views into FFCV's ring of batch
buffers, which is kept across epochs: they stay valid until the next-but-one batch is requested
(clone them to keep them). Labels (and indices) are always fresh tensors. On CUDA the float
conversion makes fresh tensors.

Devices. The decoders crop, resize, flip and (on CPU) normalise each image in one call to
:func:`datasets.resample.resample_crop`, in FFCV's numba worker threads. CPU: they write
normalised float32 straight in the layout handed out (NCHW, or NHWC viewed as channels-last
NCHW). CUDA: they write uint8 NHWC, copied with ``non_blocking=True`` from pinned memory on
FFCV's side streams (``ToDevice``), turned into a channels-last NCHW view (``ToTorchImage``) and
converted to float and normalised on the GPU in the consumer's current stream (FFCV's GPU
``NormalizeImage`` needs cupy, which is not a dependency). The CUDA path is written from FFCV's
source (ops.py, epoch_iterator.py); tests/test_gpu.py compares it with the CPU path where a GPU is
visible (bench/gpu_check.sh).

Gotchas handled: importing FFCV and creating / iterating its loaders reset torch's thread count
(restored here); an iterator abandoned mid-epoch is closed (its thread stopped and joined)
before the next epoch starts, by ``close()``, or at exit; ``indices`` are validated (FFCV does
not check them). Each FFCV loader JIT-compiles its pipeline on first use (seconds): build the
loaders once per run and reuse them across epochs.
"""
from __future__ import annotations

import atexit
import math
import os
import queue
import threading
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_threads_before = torch.get_num_threads()
import numba  # noqa: E402

# numba prefers its TBB threading layer whenever a libtbb is installed (Debian's OpenCV pulls one
# in), and FFCV only ever runs parallel code from its loader threads, never the main thread:
# TBB, set up in a thread that is gone by then, is finalised at exit from the main thread, and a
# process that trained to the end aborted now and then ("terminate called without an active
# exception", SIGABRT; numba/numba#10556 is the hang of the same pattern). OpenMP is thread-safe
# too and has nothing to finalise. NUMBA_THREADING_LAYER, when set, still wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"
from llvmlite import ir  # noqa: E402
from numba.core import types as nb_types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder,  # noqa: E402
                                   RandomResizedCropRGBImageDecoder)
from ffcv.libffcv import imdecode  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.loader.epoch_iterator import IS_CUDA as _FFCV_IS_CUDA  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402
from ffcv.traversal_order.quasi_random import QuasiRandom, generate_order_inner  # noqa: E402

from ssal_datasets.resample import (LAYOUT_CHW_F32, LAYOUT_HWC_F32, LAYOUT_HWC_U8, adjust_colors,  # noqa: E402
                               resample_crop, write_layout)

torch.set_num_threads(_threads_before)  # importing ffcv set it to 1

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
DEFAULT_CROP_RATIO = 224 / 256
ORDERS = {"quasi_random": OrderOption.QUASI_RANDOM, "random": OrderOption.RANDOM,
          "sequential": OrderOption.SEQUENTIAL}

__all__ = ["create_train_loader", "create_val_loader", "resolution_for_epoch", "TrainLoader", "ValLoader",
           "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_CROP_RATIO"]


# ------------------------------------------------------------------ schedule
def resolution_for_epoch(epoch: int, *, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                         step: int = 32) -> int:
    """FFCV-ImageNet progressive resizing: ``min_res`` up to ``start_ramp``, ``max_res`` from
    ``end_ramp`` on, linear in between rounded to a multiple of ``step``."""
    if min_res > max_res:
        raise ValueError(f"resolution_for_epoch: min_res {min_res} > max_res {max_res}")
    if step < 1:
        raise ValueError(f"resolution_for_epoch: step must be >= 1, got {step}")
    if epoch <= start_ramp:
        return int(min_res)
    if epoch >= end_ramp:
        return int(max_res)
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0]
    return int(np.round(interp / step)) * step


# ------------------------------------------------------------------ seeded randomness (numba)
@intrinsic
def _load_i64(typingctx, addr):
    """Read the int64 at a raw address (our per-loader [seed, epoch] cell) inside compiled code."""
    if not isinstance(addr, nb_types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr)

    return nb_types.int64(addr), codegen


@numba.njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _sample_key(seed, epoch, index, stream):
    k = _mix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(stream))
    k = _mix64(k ^ (np.uint64(epoch) * np.uint64(0xD1B54A32D192ED03)))
    return _mix64(k ^ (np.uint64(index) * np.uint64(0x8CB92BA72F3D8DD7)))


@numba.njit(inline="always")
def _uniform(key, k):
    """The k-th uniform number in [0, 1) of the stream ``key``."""
    z = _mix64(key + np.uint64(k + 1) * np.uint64(0x9E3779B97F4A7C15))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always")
def _flip_drawn(seed, epoch, index, flip_prob):
    """Whether sample ``index`` is flipped in ``epoch`` (hash stream 2; crops use stream 1)."""
    return flip_prob > 0 and _uniform(_sample_key(seed, epoch, index, 2), 0) < flip_prob


@numba.njit
def _seeded_random_crop(height, width, scale, log_ratio, key):
    """torchvision / FFCV RandomResizedCrop parameters, drawn from the hash stream ``key``."""
    height = np.int64(height)
    width = np.int64(width)
    area = float(height) * float(width)
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * _uniform(key, 4 * t))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _uniform(key, 4 * t + 1))
        w = np.int64(round(math.sqrt(target_area * aspect)))
        h = np.int64(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = np.int64(_uniform(key, 4 * t + 2) * (height - h + 1))
            j = np.int64(_uniform(key, 4 * t + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    r_min = math.exp(log_ratio[0])
    r_max = math.exp(log_ratio[1])
    if in_ratio < r_min:
        w = width
        h = np.int64(round(w / r_min))
    elif in_ratio > r_max:
        h = height
        w = np.int64(round(h * r_max))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit
def _center_crop(height, width, ratio):
    s = min(np.int64(height), np.int64(width))
    c = np.int64(ratio * s)
    return (np.int64(height) - c) // 2, (np.int64(width) - c) // 2, c, c


@numba.njit
def _squash_crop(height, width, ratio):
    """The region that "resize to S x S ignoring the aspect ratio, then center-crop ratio * S" keeps:
    the central ``ratio`` of each side (resized to the output size afterwards)."""
    h = np.int64(ratio * np.int64(height))
    w = np.int64(ratio * np.int64(width))
    return (np.int64(height) - h) // 2, (np.int64(width) - w) // 2, h, w


@numba.njit
def jitter_params(seed, epoch, index, strength):
    """ColorJitter(s, s, s) parameters of sample ``index`` in ``epoch`` (hash stream 3): the
    brightness, contrast and saturation factors, each uniform in ``[max(0, 1 - s), 1 + s]``, and
    the order they are applied in (a uniform permutation of 0, 1, 2), as torchvision draws them."""
    key = _sample_key(seed, epoch, index, 3)
    low = max(0.0, 1.0 - strength)
    factors = np.empty(3, np.float32)
    for k in range(3):
        factors[k] = low + (1.0 + strength - low) * _uniform(key, k)
    order = np.arange(3)
    for k in range(2, 0, -1):  # Fisher-Yates
        m = np.int64(_uniform(key, 3 + k) * (k + 1))
        order[k], order[m] = order[m], order[k]
    return factors, order


CROP_RANDOM, CROP_CENTER, CROP_SQUASH = 0, 1, 2


def _make_decode(mem_read, my_range, addr: int, crop_params: np.ndarray, crop: int, log_ratio, layout: int,
                 flip_prob: float, jitter: float = 0.0):
    """FFCV's ResizedCropRGBImageDecoder.decode with seeded (or center / squash) crop parameters,
    the seeded flip and colour jitter, and ``resample_crop`` in place of OpenCV's resize (it writes
    the output layout directly; with jitter, a float buffer that is jittered, then written)."""
    jpg = IMAGE_MODES["jpg"]
    # a fresh dispatcher per decoder, as FFCV does: sharing one between loaders made numba raise
    # KeyError inside the epoch thread when a second loader compiled against it
    imdecode_c = Compiler.compile(imdecode)
    scale = np.array([float(crop_params[0]), float(crop_params[1])])
    center_ratio = float(crop_params[0])
    log_ratio = np.array([float(log_ratio[0]), float(log_ratio[1])])
    norm_scale = (1.0 / IMAGENET_STD).astype(np.float32)
    norm_shift = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
    unit_scale = np.ones(3, np.float32)
    zero_shift = np.zeros(3, np.float32)
    jitter = float(jitter)

    def decode(batch_indices, my_storage, metadata, storage_state):
        destination, temp_storage = my_storage
        seed = _load_i64(addr)
        epoch = _load_i64(addr + 8)
        for dst_ix in my_range(len(batch_indices)):
            source_ix = batch_indices[dst_ix]
            field = metadata[source_ix]
            image_data = mem_read(field["data_ptr"], storage_state)
            height = np.uint32(field["height"])
            width = np.uint32(field["width"])
            if field["mode"] == jpg:
                temp_buffer = temp_storage[dst_ix]
                imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                selected_size = 3 * height * width
                temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                temp_buffer = temp_buffer.reshape(height, width, 3)
            else:
                temp_buffer = image_data.reshape(height, width, 3)
            if crop == CROP_CENTER:
                i, j, h, w = _center_crop(height, width, center_ratio)
            elif crop == CROP_SQUASH:
                i, j, h, w = _squash_crop(height, width, center_ratio)
            else:
                key = _sample_key(seed, epoch, source_ix, 1)
                i, j, h, w = _seeded_random_crop(height, width, scale, log_ratio, key)
            flip = _flip_drawn(seed, epoch, source_ix, flip_prob)
            if jitter > 0:
                out = destination[dst_ix]
                if layout == LAYOUT_CHW_F32:
                    pixels = np.empty((out.shape[1], out.shape[2], 3), np.float32)
                else:
                    pixels = np.empty((out.shape[0], out.shape[1], 3), np.float32)
                resample_crop(temp_buffer, i, j, h, w, pixels, unit_scale, zero_shift, LAYOUT_HWC_F32, flip)
                factors, order = jitter_params(seed, epoch, source_ix, jitter)
                adjust_colors(pixels, factors, order)
                write_layout(pixels, out, norm_scale, norm_shift, layout)
            else:
                resample_crop(temp_buffer, i, j, h, w, destination[dst_ix], norm_scale, norm_shift, layout, flip)
        return destination[:len(batch_indices)]

    return decode


class _LayoutOutput:
    """The decoders below write their output in one of resample's layouts: uint8 HWC (for the GPU,
    which normalises there), or ImageNet-normalised float32 CHW / HWC (CPU)."""

    layout = LAYOUT_HWC_U8

    def declare_state_and_memory(self, previous_state: State):
        state, (_, temp) = super().declare_state_and_memory(previous_state)
        h, w = self.output_size
        shape, dtype = {LAYOUT_HWC_U8: ((h, w, 3), np.dtype("uint8")),
                        LAYOUT_CHW_F32: ((3, h, w), np.dtype("float32")),
                        LAYOUT_HWC_F32: ((h, w, 3), np.dtype("float32"))}[self.layout]
        return replace(state, shape=shape, dtype=dtype), (AllocationQuery(shape, dtype), temp)


class SeededRandomResizedCropDecoder(_LayoutOutput, RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder with crop and flip drawn from hash(seed, epoch, index),
    writing ``layout`` (see :mod:`datasets.resample`)."""

    def __init__(self, output_size, cell: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 layout: int = LAYOUT_HWC_U8, flip_prob: float = 0.5, color_jitter: float = 0.0):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.cell = cell
        self.layout = layout
        self.flip_prob = float(flip_prob)
        self.color_jitter = float(color_jitter)

    def generate_code(self):
        decode = _make_decode(self.memory_read, Compiler.get_iterator(), int(self.cell.ctypes.data),
                              np.array([self.scale[0], self.scale[1], 0.0]), crop=CROP_RANDOM,
                              log_ratio=(math.log(self.ratio[0]), math.log(self.ratio[1])), layout=self.layout,
                              flip_prob=self.flip_prob, jitter=self.color_jitter)
        decode.is_parallel = True
        return decode


class CenterCropDecoder(_LayoutOutput, CenterCropRGBImageDecoder):
    """FFCV's CenterCropRGBImageDecoder (crop = ratio x shorter side, resized to output_size),
    writing ``layout``. ``squash=True``: the crop is ``ratio`` of each side instead (the image
    resized to a square ignoring its aspect ratio, then center-cropped)."""

    _cell = np.zeros(2, dtype=np.int64)

    def __init__(self, output_size, ratio=DEFAULT_CROP_RATIO, layout: int = LAYOUT_HWC_U8, squash: bool = False):
        super().__init__(output_size, ratio=ratio)
        self.layout = layout
        self.squash = bool(squash)

    def generate_code(self):
        decode = _make_decode(self.memory_read, Compiler.get_iterator(), int(self._cell.ctypes.data),
                              np.array([self.ratio, 0.0, 0.0]), crop=CROP_SQUASH if self.squash else CROP_CENTER,
                              log_ratio=(0.0, 0.0), layout=self.layout, flip_prob=0.0)
        decode.is_parallel = True
        return decode


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


# ------------------------------------------------------------------ iterator plumbing
_LIVE_ITERATORS: "weakref.WeakSet[_EpochIter]" = weakref.WeakSet()
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


class _EpochIter:
    """One epoch: wraps FFCV's EpochIterator, converts batches, restores torch's thread count."""

    def __init__(self, owner: "_LoaderBase", ffcv_iter, threads: int):
        self._owner = owner
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
        return self._owner._convert(batch)

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


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device {device}: only cpu and cuda are supported")
    return dev


def _dist_info(distributed) -> tuple[bool, int, int]:
    import torch.distributed as dist
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True but torch.distributed is not initialised")
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _open_beton(beton_path) -> tuple[str, int]:
    path = Path(beton_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such beton (write it with datasets/write_ffcv.py)")
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable FFCV beton ({type(err).__name__}: {err})") from None
    missing = {"image", "label"} - set(reader.field_names)
    if missing:
        raise ValueError(f"{path}: beton has fields {reader.field_names}, needs image and label")
    return str(path), int(reader.num_samples)


def _check_indices(indices, n: int) -> np.ndarray | None:
    """FFCV does not check ``indices`` (out-of-range ones read garbage): do it here."""
    if indices is None:
        return None
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"indices: expected a 1-D sequence of sample indices, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("indices: empty")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices: expected integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices: values must be in [0, {n}) for this beton, got min {lo} max {hi}")
    if np.unique(arr).size != arr.size:
        raise ValueError("indices: duplicate entries")
    return arr.astype(np.uint64)


def _check_positive(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _reuse_batch_memory(graph) -> None:
    """FFCV allocates its ring of batch buffers afresh every epoch (at res 160, batch 64 and 500 px
    images: 340 MB, most of it room for decoded JPEGs), so each epoch first-touches new pages
    (page faults and zeroing: ~10 % of the CPU loader here), and on CUDA pins them again. Keep the
    buffers while the requirements (shapes, dtypes; set_resolution changes them) stay the same.
    Safe because an epoch's thread has ended before the next epoch's starts (see __iter__)."""
    allocate = graph.allocate_memory
    held = {}

    def allocate_memory(batch_size, batches_ahead):
        key = (batch_size, batches_ahead, repr(graph.collect_requirements()[0]))
        if key not in held:
            held.clear()  # drop the old buffers before the new ones are allocated
            held[key] = allocate(batch_size, batches_ahead)
        return held[key]

    graph.allocate_memory = allocate_memory


class _LoaderBase:
    def __init__(self, *, beton: str, batch_size: int, num_workers: int, device: torch.device, channels_last: bool,
                 distributed: bool, rank: int, world_size: int, image_dtype: torch.dtype, return_index: bool):
        self.beton = beton
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.channels_last = channels_last
        self.distributed = distributed
        self.rank = rank
        self.world_size = world_size
        self.image_dtype = image_dtype
        self.return_index = return_index
        self._epoch = 0
        self._active: _EpochIter | None = None
        self._loader: Loader | None = None
        if device.type == "cuda":
            self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._inv_std = (1.0 / torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device)).view(1, 3, 1, 1)

    # pipelines -----------------------------------------------------------
    def _layout(self) -> int:
        """What the decoder writes: uint8 HWC for the GPU (normalised there, in _convert), else
        normalised float32 in the layout handed out (so nothing copies it again on CPU)."""
        if self.device.type == "cuda":
            return LAYOUT_HWC_U8
        return LAYOUT_HWC_F32 if self.channels_last else LAYOUT_CHW_F32

    def _image_tail(self) -> list:
        """The ops after the decoder: to tensors, and on to the GPU or into an NCHW view."""
        if self.device.type == "cuda":
            # uint8 NHWC -> pinned -> GPU (non-blocking) -> NCHW channels-last view; float on the GPU in _convert
            return [ToTensor(), ToDevice(self.device, non_blocking=True), ToTorchImage(channels_last=True)]
        return [ToTensor(), ToTorchImage(channels_last=True)] if self.channels_last else [ToTensor()]

    def _int_pipeline(self) -> list:
        p = [IntDecoder(), ToTensor()]
        if self.device.type == "cuda":
            p.append(ToDevice(self.device, non_blocking=True))
        return p

    def _pipelines(self, image_pipeline: list) -> dict:
        return {"image": image_pipeline, "label": self._int_pipeline(),
                "index": self._int_pipeline() if self.return_index else None}

    def _make(self, **kwargs) -> Loader:
        threads = torch.get_num_threads()
        try:
            loader = Loader(self.beton, batch_size=self.batch_size, num_workers=self.num_workers, **kwargs)
        finally:
            torch.set_num_threads(threads)
        _reuse_batch_memory(loader.graph)
        return loader

    # conversion ------------------------------------------------------------
    def _convert(self, batch):
        images, labels = batch[0], batch[1]
        labels = labels.reshape(-1).clone()
        if self.device.type == "cuda":
            x = images.to(torch.float32).sub_(self._mean).mul_(self._inv_std)
            if self.image_dtype != torch.float32:
                x = x.to(self.image_dtype)
            images = x if self.channels_last else x.contiguous()
        elif self.image_dtype != torch.float32:
            images = images.to(self.image_dtype)
        if self.return_index:
            return images, labels, batch[2].reshape(-1).clone()
        return images, labels

    # public ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._loader)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` will run."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next iteration (sample order and augmentation)."""
        _check_positive("epoch", epoch, 0)
        self._epoch = int(epoch)

    def _before_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> _EpochIter:
        self._close_active()
        threads = torch.get_num_threads()
        epoch = self._epoch
        self._before_epoch(epoch)
        self._loader.next_epoch = epoch
        try:
            it = iter(self._loader)
        finally:
            torch.set_num_threads(threads)
        self._epoch = epoch + 1
        self._active = _EpochIter(self, it, threads)
        return self._active

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop the current epoch's worker thread, if any (also done by the next ``iter()``)."""
        self._close_active()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrainLoader(_LoaderBase):
    """Random-resized-crop + horizontal flip, seeded per (seed, epoch, sample). See the module doc."""

    def __init__(self, beton_path, *, batch_size, num_workers, resolution, device, distributed=None, seed=0,
                 order="quasi_random", os_cache=True, channels_last=True, drop_last=True, indices=None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), image_dtype=torch.float32, return_index=False,
                 batches_ahead=3, color_jitter=0.0):
        _check_positive("batch_size", batch_size)
        _check_positive("num_workers", num_workers)
        _check_positive("resolution", resolution, 8)
        _check_positive("seed", seed, 0)
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {sorted(ORDERS)}, got {order!r}")
        beton, n = _open_beton(beton_path)
        dist_on, rank, world = _dist_info(distributed)
        super().__init__(beton=beton, batch_size=int(batch_size), num_workers=int(num_workers),
                         device=_resolve_device(device), channels_last=channels_last, distributed=dist_on,
                         rank=rank, world_size=world, image_dtype=image_dtype, return_index=return_index)
        self.seed = int(seed)
        self.order = order
        self.drop_last = drop_last
        idx = _check_indices(indices, n)
        self.dataset_size = n if idx is None else int(idx.size)
        self.resolution = int(resolution)
        self._cell = np.array([self.seed, 0], dtype=np.int64)  # read by the compiled pipeline by address
        ffcv_order = ORDERS[order]
        quasi = ffcv_order == OrderOption.QUASI_RANDOM
        if not (isinstance(color_jitter, (int, float)) and 0 <= color_jitter < 1):
            raise ValueError(f"color_jitter: expected a strength in [0, 1), got {color_jitter!r}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale: expected (min, max) area fractions with 0 < min <= max, got {scale!r}")
        self._decoder = SeededRandomResizedCropDecoder((self.resolution, self.resolution), self._cell,
                                                       scale=scale, ratio=ratio, layout=self._layout(),
                                                       color_jitter=color_jitter)
        image = [self._decoder] + self._image_tail()
        # quasi_random: built as random (cheap; FFCV's QuasiRandom refuses distributed), then replaced
        self._loader = self._make(os_cache=os_cache, order=OrderOption.RANDOM if quasi else ffcv_order,
                                  distributed=dist_on, seed=self.seed, indices=idx, pipelines=self._pipelines(image),
                                  drop_last=drop_last, batches_ahead=batches_ahead)
        if quasi:
            self._loader.traversal_order = StatelessQuasiRandom(self._loader)
            self._loader.first_traversal_order = self._loader.next_traversal_order()
        order_len = len(self._loader.first_traversal_order)
        self.num_samples = len(self._loader) * self.batch_size if drop_last else order_len

    def set_resolution(self, resolution: int) -> None:
        """Output size of the random-resized crop from the next epoch on (no recompilation)."""
        _check_positive("resolution", resolution, 8)
        self.resolution = int(resolution)
        self._decoder.output_size = (self.resolution, self.resolution)

    def _before_epoch(self, epoch: int) -> None:
        self._cell[1] = epoch  # no epoch thread is running now: the previous one was closed


VAL_PREPROCESS = ("center", "squash256")


class ValLoader(_LoaderBase):
    """Center crop (ratio 224/256) resized to ``resolution``, sequential order, no drop_last.
    ``preprocess="center"``: the crop is ``crop_ratio`` of the shorter side (torchvision's
    Resize(256) + CenterCrop(224)); ``"squash256"``: ``crop_ratio`` of each side (Resize((256,
    256)) ignoring the aspect ratio + CenterCrop(224), the DKS authors' evaluation).

    Distributed: rank r reads samples r, r + W, r + 2W, ... (explicit ``indices``, no padding),
    so the ranks' shares are disjoint and add up to the whole split."""

    def __init__(self, beton_path, *, batch_size, num_workers, resolution, device, distributed=None,
                 channels_last=True, crop_ratio=DEFAULT_CROP_RATIO, indices=None, image_dtype=torch.float32,
                 return_index=False, batches_ahead=3, os_cache=True, preprocess="center"):
        if preprocess not in VAL_PREPROCESS:
            raise ValueError(f"preprocess: expected one of {', '.join(VAL_PREPROCESS)}, got {preprocess!r}")
        _check_positive("batch_size", batch_size)
        _check_positive("num_workers", num_workers)
        _check_positive("resolution", resolution, 8)
        beton, n = _open_beton(beton_path)
        dist_on, rank, world = _dist_info(distributed)
        super().__init__(beton=beton, batch_size=int(batch_size), num_workers=int(num_workers),
                         device=_resolve_device(device), channels_last=channels_last, distributed=dist_on,
                         rank=rank, world_size=world, image_dtype=image_dtype, return_index=return_index)
        idx = _check_indices(indices, n)
        base = np.arange(n, dtype=np.uint64) if idx is None else idx
        self.dataset_size = int(base.size)
        share = base[rank::world]
        if share.size == 0:
            raise ValueError(f"{beton}: {base.size} samples cannot give each of {world} ranks a share")
        self.indices = share
        self.resolution = int(resolution)
        image = ([CenterCropDecoder((self.resolution, self.resolution), ratio=crop_ratio, layout=self._layout(),
                                    squash=preprocess == "squash256")]
                 + self._image_tail())
        self._loader = self._make(os_cache=os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                                  indices=share, pipelines=self._pipelines(image), drop_last=False,
                                  batches_ahead=batches_ahead)
        self.num_samples = int(share.size)


def create_train_loader(beton_path, *, batch_size: int, num_workers: int, resolution: int, device,
                        distributed: bool | None = None, seed: int = 0, order: str = "quasi_random",
                        os_cache: bool = True, channels_last: bool = True, drop_last: bool = True,
                        indices: Sequence[int] | None = None, **extra) -> TrainLoader:
    """Training loader; see :class:`TrainLoader` and the module doc. ``distributed=None`` means
    ``torch.distributed.is_initialized()``. Extra keywords: ``scale``, ``ratio`` (crop),
    ``image_dtype``, ``return_index`` (yield ``(images, labels, indices)``), ``batches_ahead``,
    ``color_jitter`` (strength s of a seeded ColorJitter(s, s, s); 0 = off)."""
    return TrainLoader(beton_path, batch_size=batch_size, num_workers=num_workers, resolution=resolution,
                       device=device, distributed=distributed, seed=seed, order=order, os_cache=os_cache,
                       channels_last=channels_last, drop_last=drop_last, indices=indices, **extra)


def create_val_loader(beton_path, *, batch_size: int, num_workers: int, resolution: int, device,
                      distributed: bool | None = None, channels_last: bool = True, **extra) -> ValLoader:
    """Evaluation loader; see :class:`ValLoader`. Extra keywords: ``crop_ratio``, ``indices``,
    ``image_dtype``, ``return_index``, ``batches_ahead``, ``os_cache``, ``preprocess``
    (``center`` | ``squash256``)."""
    return ValLoader(beton_path, batch_size=batch_size, num_workers=num_workers, resolution=resolution,
                     device=device, distributed=distributed, channels_last=channels_last, **extra)
