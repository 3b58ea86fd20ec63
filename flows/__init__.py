"""Prefect flows: each only wires tasks (installed as ``actcache.flows``; deployments point at these files)."""
