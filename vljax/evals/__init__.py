"""vljax.evals."""
