"""vljax.nn."""
