"""What an extraction reads: the model and its hooks, text sources, Hub revisions, file fingerprints."""
