"""How the train loader reads its beton (pipeline/train/data_access.py): data.order=auto picks quasi_random
without the page cache (a process then holds 2 x batch_size pages, not the beton), random with it; the
shipped recipes follow that rule; a beton too big for the node's memory is named at start-up."""
import subprocess
import sys

import pytest

from pipeline.train.config import REPO_ROOT, ConfigError, load_config
from pipeline.train.data_access import access_warnings, loader_order, node_memory_bytes

RECIPES = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
MB = 1000 ** 2


@pytest.mark.parametrize("order, os_cache, expected", [
    ("auto", True, "random"), ("auto", False, "quasi_random"),
    ("random", False, "random"), ("quasi_random", True, "quasi_random")])
def test_order_rule(order, os_cache, expected):
    cfg = load_config(None, [f"data.order={order}", f"data.os_cache={str(os_cache).lower()}"])
    assert loader_order(cfg.data.order, cfg.data.os_cache) == expected


def test_default_order_is_auto_and_bad_order_names_the_key():
    assert load_config(None).data.order == "auto"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.order=sideways"])
    assert "data.order: 'sideways' is not one of auto, quasi_random, random" in str(err.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_recipes_never_read_a_process_cached_beton_in_random_order(recipe):
    # recipes whose groupings come from a groups stage name a file that does not exist yet
    data = load_config(recipe, ["method.groups_file="]).data
    assert loader_order(data.order, data.os_cache) == ("random" if data.os_cache else "quasi_random")


def test_beton_bigger_than_half_the_memory_is_named(tmp_path):
    beton = tmp_path / "train.beton"
    with open(beton, "wb") as f:
        f.truncate(60 * MB)  # sparse: the size is what counts
    (line,) = access_warnings(beton, "auto", True, memory_bytes=100 * MB)
    assert line.startswith("data.os_cache: train.beton is 60.0 MB") and "data.os_cache=false" in line
    assert access_warnings(beton, "auto", True, memory_bytes=130 * MB) == []
    # without the page cache: quasi_random holds a window of pages, fine whatever the size
    assert access_warnings(beton, "auto", False, memory_bytes=100 * MB) == []
    # ... but random makes each process of the node hold the beton
    (line,) = access_warnings(beton, "random", False, memory_bytes=200 * MB, local_ranks=2)
    assert line.startswith("data.order: random with data.os_cache=false") and "data.order=auto" in line
    assert access_warnings(beton, "random", False, memory_bytes=200 * MB, local_ranks=1) == []
    assert access_warnings(beton, "auto", True, memory_bytes=0) == []  # memory unknown: no guess


def test_node_memory_is_at_most_the_ram():
    ram = next(int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal:"))
    assert 0 < node_memory_bytes() <= ram


@pytest.mark.slow
def test_training_warns_once_and_reads_quasi_random_without_page_cache(tiny_demo, tmp_path):
    """The real worker entry on a node 'smaller' than the beton (node_memory_bytes stands in for a machine this
    box cannot be): data.os_cache=true gets the one-line warning on stderr and still trains; with
    os_cache=false there is no warning and the train loader reads quasi_random (data.order auto)."""
    small_node = ("import sys; from pipeline.train import data_access, entry as train; "
                  "data_access.node_memory_bytes = lambda: 1; sys.exit(train.main(sys.argv[1:]))")
    common = ["--config", str(REPO_ROOT / "configs" / "demo.yaml"), f"data.root={tiny_demo}", "method.num_groups=[4]",
              "schedule.epochs=1", "train.max_steps_per_epoch=2", "data.batch_size=8", "data.num_workers=1",
              "tracking.enabled=false", "tracking.log_model=false"]
    outs = {}
    for os_cache in ("true", "false"):
        proc = subprocess.run([sys.executable, "-c", small_node, *common, f"output_dir={tmp_path / os_cache}",
                               f"data.os_cache={os_cache}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[os_cache] = proc
    warned = [ln for ln in outs["true"].stderr.splitlines() if ln.startswith("warning: data.os_cache")]
    assert len(warned) == 1 and "set data.os_cache=false" in warned[0], outs["true"].stderr[-2000:]
    assert "data order random, os_cache true" in outs["true"].stdout
    assert "warning:" not in outs["false"].stderr
    assert "data order quasi_random, os_cache false" in outs["false"].stdout
