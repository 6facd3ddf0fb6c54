"""Cost models of the split: memory and wire size (eqs. 1-3), latency (eqs. 9-13)."""
