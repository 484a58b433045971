"""vljax.data."""
