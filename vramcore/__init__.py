"""vramcore: keep model weights resident in GPU memory, and prove it."""
