"""Training shared by every method: the engine, distributed data parallel, training checkpoints,
and the derived GPU cost of a profile."""
