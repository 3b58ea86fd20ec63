"""Prefect tasks: each wraps library calls for the flows (installed as ``actcache.tasks``)."""
