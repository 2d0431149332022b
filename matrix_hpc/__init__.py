"""matrix-hpc: peer-to-peer multi-agent synthetic data generation on Ray and Slurm."""

__version__ = "0.1.0"
