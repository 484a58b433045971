"""vljax.sharding."""
