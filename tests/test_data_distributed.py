"""Two real gloo processes read the betons: disjoint shares covering every index exactly once per epoch."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
WORLD = 2


def _worker(rank: int, out_dir: str, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from datasets import loader as L

        tl = L.create_train_loader(f"{out_dir}/train.beton", batch_size=4, num_workers=1, resolution=16,
                                   device="cpu", seed=1, order="quasi_random", drop_last=False,
                                   return_index=True)  # distributed=None -> initialised group -> True
        vl = L.create_val_loader(f"{out_dir}/val.beton", batch_size=4, num_workers=1, resolution=16,
                                 device="cpu", return_index=True)
        assert tl.distributed and vl.distributed and tl.effective_order == "random"
        res = {"train_len": len(tl), "train_num_samples": tl.num_samples, "val_num_samples": vl.num_samples}
        for epoch in (0, 1):
            tl.set_epoch(epoch)
            res[f"train{epoch}"] = np.concatenate([i.numpy() for _, _, i in tl])
        res["val"] = np.concatenate([i.numpy() for _, _, i in vl])
        np.savez(f"{out_dir}/rank{rank}.npz", **res)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from datasets.layouts import scan_imagenet
    from datasets.synth import make_imagenet_tree
    from datasets.writer import WriterSettings, prepare_out_dir, write_source

    base = tmp_path_factory.mktemp("dist")
    # 3 classes x 6 train = 18 (even), val 3 x 2 + 1 converted gray JPEG = 7 (odd: no padding allowed)
    make_imagenet_tree(base / "src", num_classes=3, train_per_class=6, val_per_class=2, size_range=(20, 30),
                       bad={("val", 2): ["gray"]})
    out = prepare_out_dir(base / "out", overwrite=False)
    m = write_source(scan_imagenet(base / "src"), out, WriterSettings(workers=1), log=lambda *a: None)
    return base, m


def test_two_gloo_ranks_cover_every_index_once(written):
    import torch.multiprocessing as tmp

    base, m = written
    n_train, n_val = m["splits"]["train"]["count"], m["splits"]["val"]["count"]
    assert (n_train, n_val) == (18, 7)
    tmp.spawn(_worker, args=(str(base / "out"), str(base / "init")), nprocs=WORLD, join=True)
    ranks = [np.load(base / "out" / f"rank{r}.npz") for r in range(WORLD)]
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
