"""The README's shell and Python blocks, run in order as a new user would, against the demo bundle.

HOME and the XDG folders are temporary; each block runs in a fresh shell in one working folder, with
the variables the blocks before it exported (as in one terminal). A block that cannot run here is
marked in the README source by ``<!-- skip: REASON -->`` on the line before its fence; the test's id
names every block (heading and number), so the skipped ones show by name.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->$")
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    name: str
    language: str  # "bash" | "python"
    code: str
    skip: str | None  # the README's reason


def readme_blocks(text: str) -> list[Block]:
    """Every bash/python fenced block, named after its heading, with the skip mark on the line before it."""
    blocks: list[Block] = []
    heading, skip, fence, code = "top", None, None, []
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if fence is not None:
            if line.strip() == "```":
                if fence in RUNNABLE:
                    slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
                    counts[slug] = counts.get(slug, 0) + 1
                    blocks.append(Block(f"{slug}-{counts[slug]}", RUNNABLE[fence], "\n".join(code) + "\n", skip))
                fence, code, skip = None, [], None
            else:
                code.append(line)
            continue
        if m := FENCE.match(line):
            fence = m.group(1)
        elif line.startswith("#"):
            heading, skip = line.lstrip("#").strip(), None
        elif m := SKIP.match(line.strip()):
            skip = m.group(1)
        elif line.strip():
            skip = None  # a mark applies only to the block right after it
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks_and_every_skip_says_why() -> None:
    assert sum(b.skip is None for b in BLOCKS) >= 8
    assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)
    assert any("real model" in (b.skip or "") for b in BLOCKS)


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One user's terminal: a temporary HOME and XDG folders, a working folder, the exported variables."""
    root = tmp_path_factory.mktemp("readme")
    home = root / "home"
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "QWENVL_EDGE_"))}
    # XDG_CACHE_HOME elsewhere than ~/.cache, as many users set it: a block that hard-codes ~/.cache fails here
    env.update(HOME=str(home), XDG_CACHE_HOME=str(root / "xdg-cache"), XDG_STATE_HOME=str(home / ".local/state"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               QWENVL_EDGE_THREADS="1")  # two threads spin against each other on a busy 2-core machine
    home.mkdir()
    exported = root / "exported.sh"
    exported.write_text("")
    return {"env": env, "work": work, "exported": exported, "failed": []}


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name, marks=pytest.mark.skip(reason=f"README: {b.skip}"))
                                   if b.skip else pytest.param(b, id=b.name) for b in BLOCKS])
def test_readme_block(block: Block, shell: dict) -> None:
    if shell["failed"]:
        pytest.fail(f"an earlier block failed ({shell['failed'][0]}): the later ones build on it")
    exported = shlex.quote(str(shell["exported"]))
    if block.language == "bash":
        script = f"source {exported}\nset -euo pipefail\n{block.code}\nexport -p > {exported}\n"
        command, stdin = ["bash", "-c", script], None
    else:
        command, stdin = ["bash", "-c", f"source {exported}\nexec python -"], block.code
    done = subprocess.run(command, cwd=shell["work"], env=shell["env"], input=stdin, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_S, stdin=None if stdin is not None else subprocess.DEVNULL)
    if done.returncode != 0:
        shell["failed"].append(block.name)
    assert done.returncode == 0, f"README block {block.name} failed:\n{block.code}\n--- stdout\n{done.stdout[-3000:]}" \
                                 f"\n--- stderr\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
