"""Model architectures lmserve runs with its own forward pass."""
