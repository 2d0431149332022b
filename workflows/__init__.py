"""Generation workflows shipped with matrix-hpc (config + agents + a small dataset each)."""
