"""Skips are reported, and in CI they fail the run (a pytest plugin, loaded by tests/conftest.py).

A test that skips because something is missing on the machine (redis-server, docker-compose,
the Mooncake wheel's libibverbs1) means the suite CI runs is not the suite that ran. So every
run ends with a summary of its skips and their reasons, and with ``CI=true`` in the environment
(CI systems set it; ``.ci/run`` does) the run fails if any skip is not in the allow-list,
``tests/allowed_skips.txt``: one ``fnmatch`` pattern on the test's node id per line, with the
reason after a ``#``. The README's "Tests" section names the list; a deliberate skip is added
there, with its reason, or not at all.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

ALLOW_LIST = Path("tests") / "allowed_skips.txt"


def allowed_patterns(path: Path) -> list[str]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        pattern = line.split("#", 1)[0].strip()
        if pattern:
            out.append(pattern)
    return out


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(config), "fdpd-skip-policy")


class SkipPolicy:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.skips: list[tuple[str, str]] = []          # (node id, reason)

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skips.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(allowed, not allowed) skips."""
        patterns = allowed_patterns(self.config.rootpath / ALLOW_LIST)
        allowed, refused = [], []
        for nodeid, reason in self.skips:
            ok = any(fnmatch.fnmatchcase(nodeid, p) for p in patterns)
            (allowed if ok else refused).append((nodeid, reason))
        return allowed, refused

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.split()[1] and in_ci() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        allowed, refused = self.split()
        if not allowed and not refused:
            return
        tr = terminalreporter
        tr.section("skips")
        for title, items in ((f"allowed by {ALLOW_LIST}", allowed), ("not allowed", refused)):
            if items:
                tr.write_line(f"{len(items)} skipped, {title}:")
                for nodeid, reason in items:
                    tr.write_line(f"  {nodeid}: {reason}")
        if refused:
            verdict = "CI=true: the run FAILS" if in_ci() else "with CI=true this run would fail"
            tr.write_line(f"{verdict}: {len(refused)} test(s) skipped that {ALLOW_LIST} does "
                          f"not allow; install what they name (scripts/setup does, as root) "
                          f"or add them there with a reason")
