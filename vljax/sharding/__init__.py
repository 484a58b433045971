"""Device meshes and logical-axis sharding rules."""
from vljax.sharding.mesh import (DEFAULT_RULES, batch_sharding, logical_shardings, make_mesh,
                                 replicated)

__all__ = ["DEFAULT_RULES", "batch_sharding", "logical_shardings", "make_mesh", "replicated"]
