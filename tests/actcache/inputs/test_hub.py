"""Hub resolution: commits asked once, 429/5xx answered with backoff, the local cache when the hub is silent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from actcache.inputs import hub


class _HTTPError(Exception):
    def __init__(self, status: int, retry_after: str | None = None):
        super().__init__(f"{status} from the hub")
        self.response = SimpleNamespace(status_code=status, headers={"Retry-After": retry_after} if retry_after else {})


def test_backoff_retries_429_and_5xx_honouring_retry_after(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(hub, "_sleep", waits.append)
    answers = [_HTTPError(429, "3"), _HTTPError(503), _HTTPError(429, "0"), "sha"]

    def call():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert hub.with_backoff(call) == "sha" and waits == [3.0, 2.0, 0.0]
    waits.clear()
    with pytest.raises(_HTTPError, match="404"):  # an answer, not a hiccup: no retry
        hub.with_backoff(lambda: (_ for _ in ()).throw(_HTTPError(404)))
    assert waits == []
    with pytest.raises(_HTTPError, match="429"):  # bounded: gives up after the last delay
        hub.with_backoff(lambda: (_ for _ in ()).throw(_HTTPError(429, "999")))
    assert waits == [hub.MAX_WAIT] * len(hub.DELAYS)


def test_a_full_commit_sha_asks_nothing(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert hub.commit("acme/tiny", sha) == (sha, None)
