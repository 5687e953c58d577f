"""Dense and elastic Flax NNX models."""
