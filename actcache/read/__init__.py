"""Reading sets back: whole shards, a shuffled training stream, exclusions."""
