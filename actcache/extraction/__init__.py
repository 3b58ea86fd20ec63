"""The extraction pipeline: the plan, token shards, the forward pass and what bounds its memory."""
