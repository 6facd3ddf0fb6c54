"""Model loading and the edge/cloud halves of a split decoder."""
