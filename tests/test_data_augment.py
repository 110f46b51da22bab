"""The papers' augmentations in datasets/decoders.py: seeded colour jitter (against torchvision's own
adjust_* functions), the random-resized-crop scale, and the squash256 evaluation geometry
(against torchvision's Resize((256, 256)) + CenterCrop(224)). Real FFCV writer and loader, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ssal_datasets import decoders
from ssal_datasets import loader as L
from ssal_datasets.resample import adjust_colors
from tests.test_data_loader import betons, collect, stored_images  # noqa: F401  (betons: a fixture)
from tests.test_data_resample import reference

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def torchvision_jitter(image_hwc: np.ndarray, factors, order) -> np.ndarray:
    """torchvision's ColorJitter with the given factors and order, on a float image in [0, 255]."""
    x = torch.from_numpy(np.ascontiguousarray(image_hwc, dtype=np.float32)).permute(2, 0, 1) / 255.0
    for op in order:
        x = ADJUST[op](x, float(factors[op]))
    return (x * 255.0).permute(1, 2, 0).numpy()


def test_jitter_parameters_are_seeded_and_bounded():
    strength = 0.4
    draws = [decoders.jitter_params(7, 2, k, strength) for k in range(3000)]
    factors = np.array([f for f, _ in draws])
    assert factors.min() >= 1 - strength and factors.max() <= 1 + strength
    # uniform over the whole range, independently per adjustment
    assert (factors.min(0) < 0.61).all() and (factors.max(0) > 1.39).all()
    assert abs(float(np.corrcoef(factors[:, 0], factors[:, 1])[0, 1])) < 0.1
    orders = {tuple(o.tolist()) for _, o in draws}
    assert orders == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    again, order = decoders.jitter_params(7, 2, 11, strength)
    assert np.array_equal(again, draws[11][0]) and np.array_equal(order, draws[11][1])  # a pure function
    assert not np.array_equal(decoders.jitter_params(7, 3, 11, strength)[0], again)  # a new draw each epoch
    assert not np.array_equal(decoders.jitter_params(8, 2, 11, strength)[0], again)  # and per seed
    assert np.array_equal(decoders.jitter_params(7, 2, 11, 0.0)[0], np.ones(3, np.float32))
    assert decoders.jitter_params(7, 2, 11, 0.9)[0].min() >= 0.1 - 1e-7


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_adjust_colors_is_torchvision_color_jitter(order):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(9, 13, 3)).astype(np.float32)
    factors = np.array([1.35, 0.62, 1.3], np.float32)  # bright enough to clamp at 255
    got = image.copy()
    adjust_colors(got, factors, np.array(order))
    expected = torchvision_jitter(image, factors, order)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    assert got.min() >= 0 and got.max() <= 255 and (got == 255).any()


def test_train_loader_jitters_the_seeded_crop_with_torchvision_s_math(betons):  # noqa: F811
    """End to end: each image is the seeded crop (here with the SSAL authors' scale (0.3, 4/3)),
    resized, jittered with the factors of its own (seed, epoch, index), flipped when drawn,
    normalised."""
    out, _ = betons
    beton = out / "train.beton"
    images = stored_images(beton)
    seed, epoch, res, strength, scale = 3, 1, 24, 0.4, (0.3, 4 / 3)
    loader = L.create_train_loader(beton, batch_size=8, num_workers=2, resolution=res, device="cpu", seed=seed,
                                   order="random", drop_last=False, channels_last=False, return_index=True,
                                   scale=scale, color_jitter=strength)
    x, _, idx = collect(loader, epoch=epoch)
    again, _, idx_again = collect(loader, epoch=epoch)
    assert torch.equal(x, again) and torch.equal(idx, idx_again)  # reproducible
    for got, k in zip(x.permute(0, 2, 3, 1).numpy(), idx.tolist()):
        image = images[k]
        h, w = image.shape[:2]
        crop = decoders._seeded_random_crop(h, w, np.array(scale), np.log(np.array([3 / 4, 4 / 3])),
                                            np.uint64(decoders._sample_key(seed, epoch, k, 1)))
        flip = decoders._flip_drawn(seed, epoch, k, 0.5)
        factors, order = decoders.jitter_params(seed, epoch, k, strength)
        resized = reference(image, *crop, res, res, False)
        expected = torchvision_jitter(resized, factors, order)
        expected = expected[:, ::-1] if flip else expected
        np.testing.assert_allclose(got, (expected - L.IMAGENET_MEAN) / L.IMAGENET_STD, atol=2e-4, rtol=0,
                                   err_msg=f"sample {k}")
    # the GPU path's decoder output (uint8 HWC, normalised on the GPU) is the same jittered image, rounded
    from ssal_datasets.resample import LAYOUT_HWC_U8
    from tests.test_data_loader import uint8_batches

    decoder = decoders.SeededRandomResizedCropDecoder((res, res), np.array([seed, epoch], dtype=np.int64),
                                                      scale=scale, layout=LAYOUT_HWC_U8, color_jitter=strength)
    x_u8, idx_u8 = uint8_batches(beton, decoder)
    by_index = dict(zip(idx.tolist(), x.permute(0, 2, 3, 1).numpy() * L.IMAGENET_STD + L.IMAGENET_MEAN))
    for got, k in zip(x_u8.numpy(), idx_u8.tolist()):
        assert got.dtype == np.uint8 and np.abs(got - np.floor(by_index[k] + 0.5)).max() <= 1, k
    plain = L.create_train_loader(beton, batch_size=8, num_workers=2, resolution=res, device="cpu", seed=seed,
                                  order="random", drop_last=False, channels_last=False, return_index=True,
                                  scale=scale)
    x_plain, _, idx_plain = collect(plain, epoch=epoch)
    assert torch.equal(idx, idx_plain) and not torch.allclose(x, x_plain, atol=0.05)  # jitter changes the pixels


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """A raw beton of linear colour ramps of different aspect ratios (any interpolating filter,
    bicubic included, reproduces a linear image, so only the geometry can differ)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    sizes = [(300, 200), (180, 420), (256, 256)]
    images = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        images.append(np.stack([x * 250 / w, y * 250 / h, 0.3 * (x * 250 / w) + 0.5 * (y * 250 / h)], -1)
                      .round().astype(np.uint8))

    class Images:
        def __len__(self):
            return len(images)

        def __getitem__(self, k):
            return images[k], k

    path = tmp_path_factory.mktemp("ramps") / "ramps.beton"
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Images())
    return path, images


@pytest.mark.parametrize("preprocess", ["squash256", "center"])
def test_val_preprocessing_geometry_matches_torchvision(ramps, preprocess):
    path, images = ramps
    loader = L.create_val_loader(path, batch_size=4, num_workers=1, resolution=224, device="cpu",
                                 channels_last=False, preprocess=preprocess)
    x = torch.cat([batch[0].clone() for batch in loader])
    got = x.permute(0, 2, 3, 1).numpy() * L.IMAGENET_STD + L.IMAGENET_MEAN
    for k, image in enumerate(images):
        tensor = torch.from_numpy(image).permute(2, 0, 1).double()
        if preprocess == "squash256":  # the DKS authors: Scale([256, 256], BICUBIC) + CenterCrop(224)
            resized = TF.resize(tensor, [256, 256], InterpolationMode.BICUBIC, antialias=True)
        else:  # torchvision's usual Resize(256) + CenterCrop(224)
            resized = TF.resize(tensor, 256, InterpolationMode.BICUBIC, antialias=True)
        expected = TF.center_crop(resized, 224).permute(1, 2, 0).numpy()
        inner = (slice(3, -3), slice(3, -3))  # away from the image border, where filters pad differently
        error = np.abs(got[k][inner] - expected[inner]).max()
        assert error < 2.0, (preprocess, image.shape, error)
        # the other preprocessing is a different region: the ramps tell them apart (not the square one)
        if image.shape[0] != image.shape[1]:
            other = TF.resize(tensor, 256 if preprocess == "squash256" else [256, 256],
                              InterpolationMode.BICUBIC, antialias=True)
            other = TF.center_crop(other, 224).permute(1, 2, 0).numpy()
            assert np.abs(got[k][inner] - other[inner]).max() > 20


def test_bad_augmentation_arguments(betons):  # noqa: F811
    out, _ = betons
    kw = dict(batch_size=8, num_workers=1, resolution=24, device="cpu")
    with pytest.raises(ValueError, match="color_jitter"):
        L.create_train_loader(out / "train.beton", color_jitter=1.5, **kw)
    with pytest.raises(ValueError, match="scale"):
        L.create_train_loader(out / "train.beton", scale=(0.5, 0.2), **kw)
    with pytest.raises(ValueError, match="preprocess: expected one of center, squash256"):
        L.create_val_loader(out / "val.beton", preprocess="squash", **kw)
