"""datasets/loader.py on a small real beton (real FFCV writer + loader, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssal_datasets import decoders
from ssal_datasets import loader as L
from ssal_datasets.layouts import scan_imagenet
from ssal_datasets.synth import make_imagenet_tree
from ssal_datasets.writer import WriterSettings, prepare_out_dir, write_source

NUM_CLASSES = 4
# numba's dispatcher finaliser can print "Exception ignored ... KeyError" when FFCV's per-loader
# compiled functions are garbage collected; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader")
    make_imagenet_tree(base / "src", num_classes=NUM_CLASSES, train_per_class=10, val_per_class=3,
                       size_range=(24, 56), bad={("val", 0): ["gray"]})
    out = prepare_out_dir(base / "out", overwrite=False)
    m = write_source(scan_imagenet(base / "src"), out, WriterSettings(workers=2, write_mode="proportion"),
                     log=lambda *a: None)
    return out, m


def beton_labels(path):
    from ffcv.reader import Reader
    r = Reader(str(path))
    f = {name: f"f{i}" for i, name in enumerate(r.field_names)}
    return np.asarray(r.metadata[f["label"]]).reshape(-1)


def collect(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    xs, ys, ids = [], [], []
    for batch in loader:
        x, y, i = batch
        xs.append(x.clone())
        ys.append(y)
        ids.append(i)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


@pytest.fixture(scope="module")
def train_a(betons):
    out, _ = betons
    return L.create_train_loader(out / "train.beton", batch_size=8, num_workers=2, resolution=24, device="cpu",
                                 seed=5, order="quasi_random", drop_last=False, return_index=True)


def test_train_readback_labels_counts_and_format(betons, train_a):
    out, m = betons
    n = m["splits"]["train"]["count"]
    threads = torch.get_num_threads()
    assert train_a.dataset_size == n and train_a.num_samples == n and len(train_a) == -(-n // 8)
    x, y, idx = collect(train_a, epoch=0)
    assert torch.get_num_threads() == threads  # FFCV's thread-count reset is undone
    assert sorted(idx.tolist()) == list(range(n))  # every sample exactly once
    assert torch.equal(y, torch.from_numpy(beton_labels(out / "train.beton"))[idx])
    assert x.shape == (n, 3, 24, 24) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (n,)
    batch = next(iter(train_a))
    assert batch[0].is_contiguous(memory_format=torch.channels_last)
    assert -2.5 < float(x.min()) < 0 < float(x.max()) < 2.8  # ImageNet-normalised
    train_a.close()


def test_same_seed_same_batches_across_instances(betons, train_a):
    """Exact resume: a fresh loader (other worker count) at set_epoch(e) reproduces epoch e, images included."""
    out, _ = betons
    a0 = collect(train_a, epoch=0)
    a1 = collect(train_a)  # epoch 1 follows
    assert not torch.equal(a0[2], a1[2])  # a new order each epoch
    b = L.create_train_loader(out / "train.beton", batch_size=8, num_workers=1, resolution=24, device="cpu",
                              seed=5, order="quasi_random", drop_last=False, return_index=True)
    b1 = collect(b, epoch=1)
    for u, v in zip(a1, b1):
        assert torch.equal(u, v)
    b0 = collect(b, epoch=0)
    for u, v in zip(a0, b0):
        assert torch.equal(u, v)
    # the augmentation really is random: per sample, two epochs give different crops
    same = [torch.equal(a0[0][a0[2] == i], a1[0][a1[2] == i]) for i in range(8)]
    assert not all(same)


def test_set_resolution_and_abandoned_epoch(train_a):
    train_a.set_resolution(40)
    it = iter(train_a)
    x, _, _ = next(it)
    assert x.shape[-2:] == (40, 40)
    # abandon this epoch mid-way; the next iter() closes it cleanly
    x, _, _ = next(iter(train_a))
    assert x.shape[-2:] == (40, 40)
    train_a.set_resolution(24)
    train_a.close()
    with pytest.raises(ValueError):
        train_a.set_resolution(4)


def test_val_loader_center_crop_sequential(betons):
    out, m = betons
    n = m["splits"]["val"]["count"]
    assert n == NUM_CLASSES * 3 + 1
    v = L.create_val_loader(out / "val.beton", batch_size=5, num_workers=2, resolution=32, device="cpu",
                            channels_last=False, return_index=True)
    assert len(v) == -(-n // 5) and v.num_samples == n and v.dataset_size == n
    x, y, idx = collect(v)
    assert idx.tolist() == list(range(n))  # sequential, no drop_last, no padding
    assert y.tolist() == beton_labels(out / "val.beton").tolist()
    assert x.shape == (n, 3, 32, 32) and x.is_contiguous()
    x2, _, _ = collect(v)
    assert torch.equal(x, x2)  # deterministic
    sub = L.create_val_loader(out / "val.beton", batch_size=4, num_workers=1, resolution=32, device="cpu",
                              indices=[3, 1, 7], return_index=True)
    xs, ys, ids = collect(sub)
    assert ids.tolist() == [3, 1, 7] and sub.num_samples == 3 and sub.dataset_size == 3
    assert torch.allclose(xs, x[[3, 1, 7]])


def test_batch_buffers_are_kept_across_epochs_until_the_resolution_changes(betons):
    """FFCV allocates its batch ring every epoch; the loader keeps it while the shapes stay the same."""
    out, _ = betons
    loader = L.create_train_loader(out / "train.beton", batch_size=8, num_workers=1, resolution=24, device="cpu",
                                   seed=1, order="sequential", drop_last=False, channels_last=False)
    graph = loader._loader.graph
    a0 = [x.clone() for x, _ in loader]
    ring = graph.allocate_memory(8, 3)
    assert graph.allocate_memory(8, 3) is ring
    loader.set_resolution(32)
    assert [x.shape[-1] for x, _ in loader] == [32] * len(a0)
    assert graph.allocate_memory(8, 3) is not ring
    loader.set_resolution(24)
    loader.set_epoch(0)
    assert all(torch.equal(u, v) for u, v in zip(a0, (x for x, _ in loader)))  # reused buffers, same batches


def test_each_epoch_after_the_first_waits_once_for_the_last_epoch_before_its_thread_starts(betons, monkeypatch):
    """The kept buffers' device race (datasets/epochs.py wait_for_last_epoch): the wait runs once per
    epoch after the first, whole, cut short or at a new resolution, in the consumer's thread, when
    the last epoch's FFCV thread has ended and the new one has not started (no copy queued yet).
    On CPU the wait itself is a no-op; tests/test_gpu.py checks the race on a GPU."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    from ssal_datasets import epochs

    waits = []

    def record_wait():
        alive = [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]
        waits.append((threading.current_thread() is threading.main_thread(), len(alive)))

    monkeypatch.setattr(epochs, "wait_for_last_epoch", record_wait)
    loader = L.create_train_loader(betons[0] / "train.beton", batch_size=8, num_workers=1, resolution=24, device="cpu",
                                   seed=1, order="sequential", drop_last=False, channels_last=False)
    assert sum(1 for _ in loader) > 2 and waits == []  # the first epoch has nothing to wait for
    sum(1 for _ in loader)
    assert waits == [(True, 0)]
    next(iter(loader))  # an epoch cut short: the next iter() closes it, then waits
    loader.set_resolution(32)
    sum(1 for _ in loader)
    loader.close()
    assert waits == [(True, 0)] * 3


@pytest.mark.parametrize("bad, match", [([0, 99], "must be in"), ([-1, 2], "must be in"), ([1, 1], "duplicate"),
                                        ([0.5, 1.0], "integers"), ([[0, 1]], "1-D"), ([], "empty")])
def test_indices_are_validated(betons, bad, match):
    out, _ = betons
    with pytest.raises(ValueError, match=match):
        L.create_val_loader(out / "val.beton", batch_size=4, num_workers=1, resolution=32, device="cpu",
                            indices=bad)
    with pytest.raises(ValueError, match=match):
        L.create_train_loader(out / "train.beton", batch_size=4, num_workers=1, resolution=32, device="cpu",
                              indices=bad)


def test_bad_arguments(betons, tmp_path):
    out, _ = betons
    with pytest.raises(FileNotFoundError, match="no such beton"):
        L.create_val_loader(tmp_path / "x.beton", batch_size=4, num_workers=1, resolution=32, device="cpu")
    (tmp_path / "junk.beton").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a readable FFCV beton"):
        L.create_val_loader(tmp_path / "junk.beton", batch_size=4, num_workers=1, resolution=32, device="cpu")
    with pytest.raises(ValueError, match="order"):
        L.create_train_loader(out / "train.beton", batch_size=4, num_workers=1, resolution=32, device="cpu",
                              order="shuffled")
    with pytest.raises(ValueError, match="distributed"):
        L.create_train_loader(out / "train.beton", batch_size=4, num_workers=1, resolution=32, device="cpu",
                              distributed=True)


def test_resolution_for_epoch():
    kw = dict(min_res=160, max_res=192, start_ramp=10, end_ramp=13)
    assert [L.resolution_for_epoch(e, **kw) for e in (0, 10, 11, 12, 13, 20)] == [160, 160, 160, 192, 192, 192]
    kw = dict(min_res=32, max_res=64, start_ramp=0, end_ramp=4, step=8)
    assert [L.resolution_for_epoch(e, **kw) for e in range(5)] == [32, 40, 48, 56, 64]
    with pytest.raises(ValueError):
        L.resolution_for_epoch(0, min_res=64, max_res=32, start_ramp=0, end_ramp=1)


def test_loader_process_uses_openmp_layer_and_exits_cleanly(betons):
    """numba would pick TBB when a libtbb is installed; FFCV's thread-only use of it made finished
    processes abort at exit now and then. The loader selects OpenMP (see datasets/decoders.py)."""
    import os
    import subprocess
    import sys

    out, _ = betons
    script = ("import sys, numba\nfrom ssal_datasets import loader as L\n"
              "for make in (L.create_train_loader, L.create_val_loader):\n"
              f"    ld = make({str(out / 'train.beton')!r}, batch_size=8, num_workers=2, resolution=24, device='cpu')\n"
              "    n = sum(len(y) for _, y in ld)\n"
              "print(numba.threading_layer(), n)\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["omp", str(NUM_CLASSES * 10)], result.stdout
    assert "terminate called" not in result.stderr


def stored_images(beton):
    """Every image of a beton as uint8 HWC, read and decoded here (not through the loader)."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    r = Reader(str(beton))
    meta = r.metadata[f"f{r.field_names.index('image')}"]
    sizes = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    raw = np.fromfile(beton, dtype=np.uint8)
    images = []
    for m in meta:
        h, w, ptr = int(m["height"]), int(m["width"]), int(m["data_ptr"])
        data = raw[ptr:ptr + sizes[ptr]]
        if m["mode"] == IMAGE_MODES["jpg"]:
            image = np.empty((h, w, 3), np.uint8)
            assert imdecode(data, image, h, w, h, w, 0, 0, 1, 1, False, False) == 0
        else:
            image = data[:h * w * 3].reshape(h, w, 3)
        images.append(image)
    return images


def uint8_batches(beton, decoder):
    """The decoder's uint8 HWC output (what the CUDA path ships to the GPU), through FFCV's own Loader."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(beton), batch_size=8, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()], "index": None})
    x = torch.cat([x.clone() for x, _ in loader])
    return x, torch.arange(len(x))  # sequential: row k is sample k


@pytest.mark.parametrize("split", ["train", "val"])
def test_images_are_the_seeded_crop_flip_and_normalisation_of_the_stored_ones(betons, split):
    """End to end: each output image is the resample of its own sample's crop (seeded by
    (seed, epoch, index) for train, center for val), flipped when drawn, normalised, in the
    layout asked for; the GPU path's uint8 output is the same image rounded."""
    from ssal_datasets.resample import LAYOUT_HWC_U8
    from tests.test_data_resample import reference

    out, _ = betons
    beton = out / f"{split}.beton"
    images = stored_images(beton)
    seed, epoch, res = 3, 2, 24
    kw = dict(batch_size=8, num_workers=2, resolution=res, device="cpu", return_index=True)
    flips = []
    for variant in ("nchw", "channels_last", "uint8"):
        if variant == "uint8":
            seed_epoch = np.array([seed, epoch], dtype=np.int64)
            decoder = (decoders.SeededRandomResizedCropDecoder((res, res), seed_epoch, layout=LAYOUT_HWC_U8)
                       if split == "train" else decoders.CenterCropDecoder((res, res), layout=LAYOUT_HWC_U8))
            x, idx = uint8_batches(beton, decoder)
        else:
            channels_last = variant == "channels_last"
            loader = (L.create_train_loader(beton, seed=seed, order="random", drop_last=False,
                                            channels_last=channels_last, **kw) if split == "train"
                      else L.create_val_loader(beton, channels_last=channels_last, **kw))
            x, _, idx = collect(loader, epoch=epoch)
            assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            x = x.permute(0, 2, 3, 1)
        assert sorted(idx.tolist()) == list(range(len(images)))
        for got, k in zip(x.numpy(), idx.tolist()):
            image = images[k]
            h, w = image.shape[:2]
            if split == "train":
                top, left, ch, cw = decoders._seeded_random_crop(h, w, np.array([0.08, 1.0]),
                                                                 np.log(np.array([3 / 4, 4 / 3])),
                                                                 np.uint64(decoders._sample_key(seed, epoch, k, 1)))
                flip = decoders._flip_drawn(seed, epoch, k, 0.5)
            else:
                top, left, ch, cw = decoders._center_crop(h, w, L.DEFAULT_CROP_RATIO)
                flip = False
            flips.append(flip)
            expected = reference(image, top, left, ch, cw, res, res, flip)
            if variant == "uint8":
                assert got.dtype == np.uint8 and np.abs(got - np.floor(expected + 0.5)).max() <= 1, (split, k)
            else:
                np.testing.assert_allclose(got, (expected - L.IMAGENET_MEAN) / L.IMAGENET_STD, atol=1e-5, rtol=0,
                                           err_msg=f"{split} {variant} sample {k}")
    if split == "train":
        assert 0 < sum(flips) < len(flips)  # both branches of the flip were checked
