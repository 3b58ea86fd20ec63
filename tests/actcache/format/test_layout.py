"""Writer names (temp files, leases): the new form carries the process's start, the form before 0.7.1 still reads."""

from __future__ import annotations

import pytest

from actcache.format import layout


def test_temp_and_lease_names_round_trip_with_and_without_a_start():
    assert layout.parse_temp(layout.temp_name("shards/000001.safetensors", "vm", 12, "0badf00d", 345)) == (
        "shards/000001.safetensors",
        "vm",
        12,
        345,
    )
    assert layout.parse_temp("shards/000001.safetensors.tmp-vm-12-0badf00d") == (
        "shards/000001.safetensors",
        "vm",
        12,
        None,
    )
    assert layout.parse_writer_file(layout.writer_file("host.example", 7, "0badf00d", 99)) == ("host.example", 7, 99)
    assert layout.parse_writer_file("writers/vm-7-0badf00d.json") == ("vm", 7, None)


@pytest.mark.parametrize(
    "name",
    ["notes.tex.tmp-host-12-draft", "x.tmp-vm-12.-0badf00d", "x.tmp-vm-12.3.4-0badf00d", "x.tmp-vm-.5-0badf00d"],
)
def test_other_names_are_not_temp_files(name):
    assert layout.parse_temp(name) is None
    assert layout.parse_writer_file(f"writers/{name.split('.tmp-')[1]}.json") is None
