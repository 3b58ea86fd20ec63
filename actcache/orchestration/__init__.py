"""Prefect at the edge: the temporary API server, progress artifacts, the run's logger and AwsCredentials blocks.

The only library code that imports Prefect (a lint rule keeps it so); the flows and tasks live in
actcache.flows/tasks.
"""
