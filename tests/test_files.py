"""ssal_datasets.files.atomic_write, the one atomic write (manifests, checkpoints, configs, tracking state):
the target holds the old content or the new one, never a part, and no temporary file is left behind."""
import os

import pytest

from ssal_datasets.files import TEMPORARY_NAME, atomic_write, temporaries_in, temporary_path


def test_text_bytes_and_writer_land_whole(tmp_path):
    path = tmp_path / "sub" / "f.txt"  # parent folders are created
    atomic_write(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda handle: handle.write(b"from a writer"))
    assert path.read_bytes() == b"from a writer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old")

    def half_then_fail(handle):
        handle.write(b"ne")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        atomic_write(path, half_then_fail)
    seen = []

    def killed_before_rename(target):
        seen.append(target)
        raise KeyboardInterrupt  # the temporary file is complete on disk here

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new", before_replace=killed_before_rename)
    assert seen == [path] and path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_temporary_name_pattern_matches_what_a_killed_write_leaves(tmp_path):
    """checkpoint.remove_stale_temporaries finds a killed save's file by this pattern."""
    match = TEMPORARY_NAME.match(".last.pt.tmp-4242")
    assert match and match["name"] == "last.pt" and match["pid"] == "4242"
    assert TEMPORARY_NAME.match("last.pt") is None


def test_temporary_path_is_what_temporaries_in_finds(tmp_path):
    """The betons' writer and atomic_write share the name; prepare_out_dir and
    checkpoint.remove_stale_temporaries find the leftovers by it (files only)."""
    tmp = temporary_path(tmp_path / "train.beton")
    assert tmp == tmp_path / f".train.beton.tmp-{os.getpid()}" and TEMPORARY_NAME.match(tmp.name)
    tmp.write_bytes(b"")
    (tmp_path / ".last.pt.tmp-4242").write_bytes(b"")
    (tmp_path / "train.beton").write_bytes(b"")
    (tmp_path / ".dir.tmp-7").mkdir()
    assert temporaries_in(tmp_path) == sorted([(tmp, os.getpid()), (tmp_path / ".last.pt.tmp-4242", 4242)])
    assert temporaries_in(tmp_path / "missing") == []
