"""Prefect at the edge: the temporary API server (the flows and tasks live in actcache.flows/tasks)."""
