"""Host-memory stand-in for VRAM, with fault injection, for tests and demos of vramcore."""
