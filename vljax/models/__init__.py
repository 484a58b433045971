"""vljax.models."""
