"""What a results file records of where it comes from (``tools.provenance.stamp``), as the
tests of its writers check it."""

from __future__ import annotations

import shlex


def assert_stamped(report: dict, *command: str) -> None:
    """``report`` names a commit and the command that wrote it, and says ``allow_dirty`` exactly
    when the commit is ``-dirty`` (tests pass ``--allow-dirty``, so they run in a checkout with
    uncommitted changes too; from a clean clone, as in CI, they record a clean commit)."""
    assert report["command"] == shlex.join(command)
    assert report["commit"]
    assert report.get("allow_dirty", False) is report["commit"].endswith("-dirty")
