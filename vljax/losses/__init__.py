"""vljax.losses."""
