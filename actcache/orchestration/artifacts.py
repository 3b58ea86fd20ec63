"""Prefect progress artifacts: the count of a long step, shown in the UI of the flow run it belongs to."""

from __future__ import annotations

from typing import Any


def create_progress(key: str, description: str) -> Any | None:
    """A progress artifact at 0% named ``key``, or None outside a flow run (nowhere to publish)."""
    from prefect.artifacts import create_progress_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    return create_progress_artifact(progress=0.0, key=key, description=description)


def update_progress(artifact_id: Any, value: float) -> None:
    """Set the artifact ``artifact_id`` to ``value`` percent: one blocking API call."""
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id, progress=value)
