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
(:func:`ssal_datasets.decoders.jitter_params`), so it is reproducible in the same way.

Lifetime of a batch. On CPU the images of a batch are views into FFCV's ring of batch
buffers, which is kept across epochs: they stay valid until the next-but-one batch is requested
(clone them to keep them). Labels (and indices) are always fresh tensors. On CUDA the float
conversion makes fresh tensors.

Devices. The decoders crop, resize, flip and (on CPU) normalise each image in one call to
:func:`ssal_datasets.resample.resample_crop`, in FFCV's numba worker threads. CPU: they write
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

Layout: this module holds the loaders (argument checks, FFCV pipelines, batch conversion); the
seeded kernels and decoders are in :mod:`ssal_datasets.decoders`, the patched FFCV epoch machinery
(quasi-random order, kept batch buffers, the epoch iterator and its shutdown) in
:mod:`ssal_datasets.epochs`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# decoders first: it imports FFCV with numba's threading layer chosen and torch's thread count kept
from ssal_datasets.decoders import (DEFAULT_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, CenterCropDecoder,
                                    SeededRandomResizedCropDecoder)
from ssal_datasets.cpus import usable_cpus
from ssal_datasets.epochs import EpochIter, StatelessQuasiRandom, reuse_batch_memory
from ssal_datasets.resample import LAYOUT_CHW_F32, LAYOUT_HWC_F32, LAYOUT_HWC_U8
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

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
        self._active: EpochIter | None = None
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
            # threads beyond the CPUs this process may run on only take turns on them
            loader = Loader(self.beton, batch_size=self.batch_size, num_workers=min(self.num_workers, usable_cpus()),
                            **kwargs)
        finally:
            torch.set_num_threads(threads)
        reuse_batch_memory(loader.graph)
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

    def __iter__(self) -> EpochIter:
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
        self._active = EpochIter(it, threads, self._convert)
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
        self._seed_epoch = np.array([self.seed, 0], dtype=np.int64)  # read by the compiled pipeline by address
        ffcv_order = ORDERS[order]
        quasi = ffcv_order == OrderOption.QUASI_RANDOM
        if not (isinstance(color_jitter, (int, float)) and 0 <= color_jitter < 1):
            raise ValueError(f"color_jitter: expected a strength in [0, 1), got {color_jitter!r}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale: expected (min, max) area fractions with 0 < min <= max, got {scale!r}")
        self._decoder = SeededRandomResizedCropDecoder((self.resolution, self.resolution), self._seed_epoch,
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
        self._seed_epoch[1] = epoch  # no epoch thread is running now: the previous one was closed


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
