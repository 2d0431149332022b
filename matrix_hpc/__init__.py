"""matrix-hpc: peer-to-peer multi-agent synthetic data generation on Ray and Slurm."""

__version__ = "0.1.0"


def submit(config: str, overrides: list[str] | None = None, executor: object = None) -> object:
    """Submit the run in ``config`` to Slurm; returns the submitit job (see ``matrix_hpc.cluster.slurm``)."""
    from .cluster.slurm import submit as _submit

    return _submit(config, overrides, executor)
