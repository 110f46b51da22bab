"""The docs hold: every runnable command in README.md and docs/*.md runs, every relative link
resolves, every docs page is linked from the README, and the README stays a short front page.

A block is runnable when the line `<!-- runnable -->` stands right before its ```bash fence
(docs/ARCHITECTURE.md, "Docs"). Each page's runnable blocks run in order, by `bash -euo pipefail`,
in a temporary copy of the repository whose packages are the ones imported (so that the configs'
relative paths, data/ and runs/, land in the copy), with the tiny demo set as data/demo unless
the page writes the demo set itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
# The other Markdown files the pages link to: their links must hold too.
LINKED_READMES = [REPO / "datasets" / "README.md", REPO / "slurm" / "README.md"]
README_MAX_LINES = 200
# Words of the place this was developed in, which a reader elsewhere cannot use.
PLACE_WORDS = ("device tool", "workplace", "carry:", "timeout_s")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Top-level folders that are generated or machine-specific, and never part of a copy.
NOT_COPIED_AT_TOP = {".git", ".venv", ".device", ".pytest_cache", "data", "runs", "mlruns", "mlartifacts",
                     "outputs", ".gl", "gpu_check_out"}


class DocsError(ValueError):
    pass


def runnable_blocks(text: str, name: str = "page") -> list[str]:
    """The bodies of the ```bash blocks that follow a MARKER line; a marker before anything else is
    an error (a runnable block that silently stopped running would prove nothing)."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() != MARKER:
            index += 1
            continue
        fence = index + 1
        if fence >= len(lines) or lines[fence].strip() != "```bash":
            raise DocsError(f"{name}:{index + 1}: {MARKER} must stand right before a ```bash fence")
        end = fence + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise DocsError(f"{name}:{fence + 1}: the runnable block is never closed")
        blocks.append("\n".join(lines[fence + 1:end]))
        index = end + 1
    return blocks


def relative_links(text: str) -> list[str]:
    """Link targets that are files of this repository (no scheme, no pure #anchor), anchors cut off."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def _ignore(folder: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".beton", ".egg-info"))}
    if Path(folder) == REPO:
        ignored |= NOT_COPIED_AT_TOP & set(names)
    return ignored


def repository_copy(dst: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the source tree at `dst`, and the environment that makes its packages the imported
    ones: the root on PYTHONPATH (found before the editable install's finder), `ssal_datasets` as a
    link to datasets/ (the install's mapping), `.venv` and `python` the interpreter running the tests."""
    shutil.copytree(REPO, dst, ignore=_ignore, symlinks=True)
    (dst / "ssal_datasets").symlink_to("datasets", target_is_directory=True)
    (dst / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    tmp = dst.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(PYTHONPATH=str(dst), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               TMPDIR=str(tmp), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return dst, env


def run_blocks(blocks: list[str], cwd: Path, env: dict[str, str]) -> str | None:
    """Run the blocks in order (bash -e: the first failing command fails its block); the first failure,
    described with the block and its output's tail, or None."""
    for number, block in enumerate(blocks, 1):
        proc = subprocess.run(["bash", "-euxo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            return (f"runnable block {number} failed (rc={proc.returncode}):\n{block}\n"
                    f"--- output (tail) ---\n{(proc.stdout + proc.stderr)[-4000:]}")
    return None


def _pages_with_commands() -> list[Path]:
    return [page for page in PAGES if runnable_blocks(page.read_text(), page.name)]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ----------------------------------------------------------------------------- the marker


def test_runnable_blocks_are_found_and_a_stray_marker_is_refused():
    text = f"intro\n{MARKER}\n```bash\necho one\necho two\n```\n\n```bash\nnot marked\n```\n{MARKER}\n```bash\nls\n```\n"
    assert runnable_blocks(text) == ["echo one\necho two", "ls"]
    with pytest.raises(DocsError, match="right before"):
        runnable_blocks(f"{MARKER}\n\n```bash\nls\n```\n")
    with pytest.raises(DocsError, match="never closed"):
        runnable_blocks(f"{MARKER}\n```bash\nls\n")


def test_a_failing_command_fails_its_block(tmp_path):
    assert run_blocks(["echo one > a", "test -f a"], tmp_path, dict(os.environ)) is None
    failure = run_blocks(["true", "false\necho never", "true"], tmp_path, dict(os.environ))
    assert failure is not None and failure.startswith("runnable block 2 failed (rc=1)")
    assert run_blocks(["false | true"], tmp_path, dict(os.environ)) is not None  # pipefail


def test_every_page_parses_and_the_readme_has_runnable_commands():
    for page in PAGES:
        runnable_blocks(page.read_text(), _rel(page))  # raises on a stray marker
    assert runnable_blocks(README.read_text()), "README.md: the five commands of a real run must be runnable"


# ----------------------------------------------------------------------------- pages and links


def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    linked = {(REPO / target).resolve() for target in relative_links(README.read_text())}
    unlinked = [_rel(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_every_relative_link_points_to_a_file():
    broken = [f"{_rel(page)}: {target}" for page in PAGES + LINKED_READMES
              for target in relative_links(page.read_text()) if not (page.parent / target).exists()]
    assert not broken, f"links to missing files: {broken}"


def test_docs_pages_named_in_the_code_exist():
    """`--help` epilogues and messages send readers to docs/*.md: those pages must exist."""
    named = set()
    for source in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("datasets/*.py"), *REPO.glob("bench/*")]:
        if source.is_file():
            named |= {(source, m) for m in re.findall(r"docs/[A-Za-z_]+\.md", source.read_text(errors="replace"))}
    missing = [f"{_rel(source)}: {page}" for source, page in sorted(named) if not (REPO / page).is_file()]
    assert not missing, f"docs pages named in the code but absent: {missing}"


def test_the_docs_name_no_tool_of_the_place_they_were_written_in():
    # whole words: a config key such as train.hang_timeout_s is not the tool's timeout_s
    found = [f"{_rel(page)}: {word!r}" for page in PAGES for word in PLACE_WORDS
             if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", page.read_text().lower())]
    assert not found, f"speak of 'a machine with a GPU', not of this workplace's tools: {found}"


# ----------------------------------------------------------------------------- the commands run


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_commands(), ids=_rel)
def test_runnable_commands_of_the_page_succeed(page, tiny_demo, tmp_path):
    root, env = repository_copy(tmp_path / "repo")
    blocks = runnable_blocks(page.read_text(), _rel(page))
    if not any("write_ffcv.py demo" in block for block in blocks):
        shutil.copytree(tiny_demo, root / "data" / "demo")
    failure = run_blocks(blocks, root, env)
    assert failure is None, f"{_rel(page)}, {failure}"
