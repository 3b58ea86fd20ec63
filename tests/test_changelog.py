"""CHANGELOG.md's newest entry names the version that is installed: a release changes both together."""

from __future__ import annotations

import re
from pathlib import Path

import actcache

CHANGELOG = Path(__file__).resolve().parents[1] / "CHANGELOG.md"
ENTRY = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", re.M)


def test_newest_entry_is_the_installed_version():
    entries = ENTRY.findall(CHANGELOG.read_text())
    assert entries, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' entry"
    assert entries[0][0] == actcache.__version__


def test_entries_go_newest_first():
    entries = ENTRY.findall(CHANGELOG.read_text())
    versions = [tuple(int(p) for p in v.split(".")) for v, _ in entries]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    dates = [d for _, d in entries]
    assert dates == sorted(dates, reverse=True)
