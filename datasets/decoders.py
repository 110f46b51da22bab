"""The image half of the FFCV loaders: seeded crop / flip / colour-jitter kernels and the decoders
that run them (see :mod:`ssal_datasets.loader` for the loaders that use them).

    SeededRandomResizedCropDecoder(output_size, seed_epoch, ...)  train: crop + flip from hash(seed, epoch, index)
    CenterCropDecoder(output_size, ratio, ...)               val: center crop or squash256
    jitter_params(seed, epoch, index, strength)             ColorJitter factors + order (hash stream 3)

Every random number comes from a counter-based hash of ``(seed, epoch, sample index, stream)``
(stream 1: crop, 2: flip, 3: colour jitter), so an epoch's images do not depend on which worker
thread decoded which sample. The decoders read ``[seed, epoch]`` from a small int64 array by
address inside the compiled pipeline, so a new epoch needs no recompilation. Each decoder writes
one of :mod:`ssal_datasets.resample`'s layouts straight into FFCV's batch buffer.

Kept apart from ``loader.py`` because this is numba code compiled into FFCV's pipeline (kernels,
decode closures, FFCV's decoder classes), while the loaders are plain Python around FFCV's Loader.
This module is also where FFCV is first imported (numba's threading layer chosen, torch's thread
count kept): import it before any other FFCV import.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

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

from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder,  # noqa: E402
                                   RandomResizedCropRGBImageDecoder)
from ffcv.libffcv import imdecode  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402

from ssal_datasets.resample import (LAYOUT_CHW_F32, LAYOUT_HWC_F32, LAYOUT_HWC_U8, adjust_colors,  # noqa: E402
                               resample_crop, write_layout)

torch.set_num_threads(_threads_before)  # importing ffcv set it to 1

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
DEFAULT_CROP_RATIO = 224 / 256


# ------------------------------------------------------------------ seeded randomness (numba)
@intrinsic
def _load_i64(typingctx, addr):
    """Read the int64 at a raw address (our per-loader ``seed_epoch`` pair) inside compiled code."""
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
    writing ``layout`` (see :mod:`ssal_datasets.resample`)."""

    def __init__(self, output_size, seed_epoch: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 layout: int = LAYOUT_HWC_U8, flip_prob: float = 0.5, color_jitter: float = 0.0):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed_epoch = seed_epoch
        self.layout = layout
        self.flip_prob = float(flip_prob)
        self.color_jitter = float(color_jitter)

    def generate_code(self):
        decode = _make_decode(self.memory_read, Compiler.get_iterator(), int(self.seed_epoch.ctypes.data),
                              np.array([self.scale[0], self.scale[1], 0.0]), crop=CROP_RANDOM,
                              log_ratio=(math.log(self.ratio[0]), math.log(self.ratio[1])), layout=self.layout,
                              flip_prob=self.flip_prob, jitter=self.color_jitter)
        decode.is_parallel = True
        return decode


class CenterCropDecoder(_LayoutOutput, CenterCropRGBImageDecoder):
    """FFCV's CenterCropRGBImageDecoder (crop = ratio x shorter side, resized to output_size),
    writing ``layout``. ``squash=True``: the crop is ``ratio`` of each side instead (the image
    resized to a square ignoring its aspect ratio, then center-cropped)."""

    _seed_epoch = np.zeros(2, dtype=np.int64)

    def __init__(self, output_size, ratio=DEFAULT_CROP_RATIO, layout: int = LAYOUT_HWC_U8, squash: bool = False):
        super().__init__(output_size, ratio=ratio)
        self.layout = layout
        self.squash = bool(squash)

    def generate_code(self):
        decode = _make_decode(self.memory_read, Compiler.get_iterator(), int(self._seed_epoch.ctypes.data),
                              np.array([self.ratio, 0.0, 0.0]), crop=CROP_SQUASH if self.squash else CROP_CENTER,
                              log_ratio=(0.0, 0.0), layout=self.layout, flip_prob=0.0)
        decode.is_parallel = True
        return decode
