"""Each completion record names the software and device that wrote it; show/verify report a mixed set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actcache.cli.app import main
from actcache.extraction import environment


def test_current_names_versions_device_and_engine():
    env = environment.current("cpu", "hf-sdpa")
    assert set(env) == set(environment.FIELDS) - {"cuda"}
    assert env["device"] == "cpu" and env["engine"] == "hf-sdpa" and env["torch"].startswith("2.")
    assert environment.current("auto", "bridge")["device"] in ("cpu", "cuda")


def test_a_cuda_device_is_named_with_its_cuda_version(monkeypatch):
    """No GPU here: torch's own answers are stood in for, to check what a CUDA worker records."""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev: asked.append(dev) or "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    env = environment._device.__wrapped__("cuda:1")
    assert env == {"device": "cuda", "device_name": "NVIDIA H200", "cuda": "12.8"}
    assert asked == [torch.device("cuda:1")]


def test_differences_group_shards_by_value():
    a = environment.current("cpu", "bridge")
    b = {**a, "torch": "2.9.0", "device": "cuda", "device_name": "NVIDIA H200"}
    diff = environment.differences({0: a, 1: a, 2: a, 3: b, 5: a, 6: None})
    assert diff["torch"] == f"torch {a['torch']} (shards 0-2, 5), 2.9.0 (shard 3), unrecorded (shard 6)"
    assert set(diff) == set(environment.FIELDS)  # shard 6 recorded none of them
    assert environment.differences({0: a, 1: dict(a)}) == {} and environment.differences({0: None, 1: None}) == {}


@pytest.fixture
def extracted(base_config) -> Path:
    import actcache

    return Path(actcache.extract(base_config))


def _edit_env(set_dir: Path, index: int, **changes) -> None:
    """Pretend shard ``index`` was written elsewhere: its record, and the manifest's copy of it, sealed as actcache
    writes them (an unsealed edit is damage)."""
    from actcache.format.records import SEAL, sealed

    def edit(obj: dict) -> dict:
        obj["extra"]["env"].update(changes)
        return sealed(obj) if SEAL in obj else obj

    rec_path = set_dir / "done" / f"{index:06d}.json"
    rec_path.write_text(json.dumps(edit(json.loads(rec_path.read_text()))))
    m = json.loads((set_dir / "manifest.json").read_text())
    m["shards"][index] = edit(m["shards"][index])
    (set_dir / "manifest.json").write_text(json.dumps(sealed(m)))


@pytest.mark.usefixtures("prefect_harness")
def test_records_carry_the_environment_and_a_mixed_set_warns(extracted, capsys):
    m = json.loads((extracted / "manifest.json").read_text())
    envs = [s["extra"]["env"] for s in m["shards"]]
    assert envs == [environment.current("cpu", m["key"]["forward"])] * 4  # every record says who wrote it
    assert main(["verify", str(extracted)]) == 0 and "warning" not in capsys.readouterr().err

    _edit_env(extracted, 3, torch="2.9.0", device="cuda", device_name="NVIDIA H200")
    assert main(["show", str(extracted)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("actcache: warning: ") and "torch" in err[0], err
    assert "2.9.0 (shard 3)" in err[0] and "NVIDIA H200 (shard 3)" in err[0]
    assert main(["verify", str(extracted)]) == 0  # same model, inputs and engine: a warning, not a failure
    assert "different environments" in capsys.readouterr().err

    _edit_env(extracted, 1, engine="bridge" if m["key"]["forward"] != "bridge" else "hf-sdpa")
    assert main(["verify", str(extracted)]) == 1  # contradicts the key: these bytes are not this set's
    assert "shards [1] were computed by another engine" in capsys.readouterr().err
