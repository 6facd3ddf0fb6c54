"""In-process sessions (unsplit and split), the wire between the halves, and generation."""
