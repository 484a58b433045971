"""vljax.train."""
