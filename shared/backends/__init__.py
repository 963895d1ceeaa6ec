"""Ways of running a case on an HPC: one module per scheduler (pueue, Slurm) behind one interface."""
