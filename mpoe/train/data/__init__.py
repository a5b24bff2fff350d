"""Documents to batches: reading sources, tokenizing, caching, and the training objectives."""
