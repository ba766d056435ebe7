"""``scripts/setup-system``: installs the missing system packages with apt as root, and only
those; otherwise says in one line what to run. Driven with fake ``apt-get``/``id``/``dpkg`` on a
PATH where none of the packages exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "setup-system"
ALL = ["redis-server", "docker-compose", "libibverbs1", "kubectl"]


@pytest.fixture
def fakes(tmp_path):
    """A bin directory with fake system tools; calls to apt-get are logged."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    for tool in ("awk", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))

    def fake(name: str, body: str) -> None:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)

    fake("apt-get", f'echo "$@" >> {log}')
    # kubectl has no candidate, as on a stock Debian/Ubuntu.
    fake("apt-cache", 'if [ "$2" = kubectl ]; then echo "  Candidate: (none)"; '
                      'else echo "  Candidate: 1.0"; fi')
    fake("dpkg", "exit 1")
    fake("ldconfig", "exit 0")
    fake("id", 'echo "$FAKE_UID"')

    def run(uid: int, present: tuple[str, ...] = ()) -> tuple[str, list[str]]:
        for tool in present:
            if tool == "libibverbs1":
                fake("dpkg", "exit 0")          # dpkg -s libibverbs1: installed
            else:
                fake(tool, "exit 0")
        out = subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True,
                             timeout=30, env={"PATH": str(bin_dir), "FAKE_UID": str(uid)})
        assert out.returncode == 0, out.stderr
        calls = log.read_text().splitlines() if log.exists() else []
        return out.stderr, calls

    return run


def test_root_installs_what_apt_has_and_says_where_the_rest_is(fakes):
    stderr, calls = fakes(0, present=("docker-compose",))
    assert calls == ["update -qq", "install -y -qq redis-server libibverbs1"]
    assert "kubectl is not in your apt sources" in stderr and "kubernetes.io" in stderr


def test_without_root_one_line_says_what_to_run(fakes):
    stderr, calls = fakes(1000)
    assert calls == []
    assert stderr.strip().splitlines() == [
        "scripts/setup: missing " + " ".join(ALL) + ": run 'sudo apt-get update && sudo "
        "apt-get install -y " + " ".join(ALL) + "' (or scripts/setup as root)"]


def test_nothing_missing_nothing_done(fakes):
    stderr, calls = fakes(0, present=tuple(ALL))
    assert (stderr, calls) == ("", [])
