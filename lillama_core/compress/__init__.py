"""The compression loop: capture of block inputs, one layer's training, the walk over blocks, healing,
activation storage and per-layer checkpoints."""
