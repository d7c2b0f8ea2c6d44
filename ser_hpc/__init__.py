"""ser-hpc: speech emotion recognition (EmoSPeech 2024 system) as an HPC batch job suite."""

__version__ = "0.1.0"
