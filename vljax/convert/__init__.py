"""vljax.convert."""
