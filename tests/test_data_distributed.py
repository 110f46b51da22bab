"""Two real gloo processes read the betons: disjoint shares covering every index exactly once per epoch, in
random and in quasi_random order (one global order split in blocks)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
WORLD = 2
# quasi_random on 17 of the 18 train samples: not a multiple of the world size, so one sample is repeated
QUASI = dict(batch_size=4, num_workers=1, resolution=16, device="cpu", seed=1, order="quasi_random",
             drop_last=False, indices=list(range(17)))


def _worker(rank: int, out_dir: str, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from ssal_datasets import loader as L

        tl = L.create_train_loader(f"{out_dir}/train.beton", batch_size=4, num_workers=1, resolution=16,
                                   device="cpu", seed=1, order="random", drop_last=False,
                                   return_index=True)  # distributed=None -> initialised group -> True
        ql = L.create_train_loader(f"{out_dir}/train.beton", return_index=True, **QUASI)
        vl = L.create_val_loader(f"{out_dir}/val.beton", batch_size=4, num_workers=1, resolution=16,
                                 device="cpu", return_index=True)
        assert tl.distributed and ql.distributed and vl.distributed
        res = {"train_len": len(tl), "train_num_samples": tl.num_samples, "val_num_samples": vl.num_samples}
        for epoch in (0, 1):
            tl.set_epoch(epoch)
            res[f"train{epoch}"] = np.concatenate([i.numpy() for _, _, i in tl])
            ql.set_epoch(epoch)
            res[f"quasi{epoch}"] = np.concatenate([i.numpy() for _, _, i in ql])
        res["val"] = np.concatenate([i.numpy() for _, _, i in vl])
        np.savez(f"{out_dir}/rank{rank}.npz", **res)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from ssal_datasets.layouts import scan_imagenet
    from ssal_datasets.synth import make_imagenet_tree
    from ssal_datasets.writer import WriterSettings, prepare_out_dir, write_source

    base = tmp_path_factory.mktemp("dist")
    # 3 classes x 6 train = 18 (even), val 3 x 2 + 1 converted gray JPEG = 7 (odd: no padding allowed)
    make_imagenet_tree(base / "src", num_classes=3, train_per_class=6, val_per_class=2, size_range=(20, 30),
                       bad={("val", 2): ["gray"]})
    out = prepare_out_dir(base / "out", overwrite=False)
    m = write_source(scan_imagenet(base / "src"), out, WriterSettings(workers=1), log=lambda *a: None)
    return base, m


@pytest.fixture(scope="module")
def ranks(written):
    """What each of the two gloo ranks read (the workers run once for the module's tests)."""
    import torch.multiprocessing as tmp

    base, _ = written
    tmp.spawn(_worker, args=(str(base / "out"), str(base / "init")), nprocs=WORLD, join=True)
    return [dict(np.load(base / "out" / f"rank{r}.npz")) for r in range(WORLD)]


def test_two_gloo_ranks_cover_every_index_once(written, ranks):
    _, m = written
    n_train, n_val = m["splits"]["train"]["count"], m["splits"]["val"]["count"]
    assert (n_train, n_val) == (18, 7)
    for epoch in (0, 1):
        parts = [r[f"train{epoch}"] for r in ranks]
        assert all(len(p) == n_train // WORLD for p in parts)
        assert not set(parts[0]) & set(parts[1])  # disjoint
        assert sorted(np.concatenate(parts).tolist()) == list(range(n_train))  # each index exactly once
    assert not np.array_equal(ranks[0]["train0"], ranks[0]["train1"])  # reshuffled per epoch
    val = [r["val"] for r in ranks]
    assert sorted(np.concatenate(val).tolist()) == list(range(n_val))  # no padding, no drop
    assert sum(int(r["val_num_samples"]) for r in ranks) == n_val
    assert all(int(r["train_num_samples"]) == n_train // WORLD for r in ranks)


def test_quasi_random_ranks_split_one_global_order(written, ranks):
    """Distributed quasi_random (FFCV 1.0.2 refuses it): every rank draws the single-process order and
    takes its own contiguous block, padded like DistributedSampler; a new order every epoch."""
    from ssal_datasets import loader as L

    base, _ = written
    single = L.create_train_loader(base / "out" / "train.beton", return_index=True, distributed=False, **QUASI)
    orders = []
    for epoch in (0, 1):
        single.set_epoch(epoch)
        order = np.concatenate([i.numpy() for _, _, i in single])
        assert sorted(order.tolist()) == list(range(17))
        parts = [r[f"quasi{epoch}"] for r in ranks]
        assert [len(p) for p in parts] == [9, 9]
        assert np.concatenate(parts).tolist() == order.tolist() + order[:1].tolist()  # blocks of one order
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    single.close()
