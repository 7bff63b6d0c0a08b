"""Tensor parallelism across processes: rank 0 spawns and drives ranks 1..N-1 with broadcast step plans."""
