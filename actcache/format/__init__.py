"""The on-disk format of a set: its key, paths, shard files, completion records and manifest."""
