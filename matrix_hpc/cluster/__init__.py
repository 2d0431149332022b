"""Where Ray runs: a private local cluster now; Slurm via submitit later."""

from .local import RayCluster, start_ray

__all__ = ["RayCluster", "start_ray"]
