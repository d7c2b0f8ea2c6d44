#!/bin/bash
# Submit a grid by hand with plain sbatch (no submitit on the login node needed at run time):
#   slurm/submit_grid.sh configs/grid/emospeech2024.yaml [--profile P.yaml] [key=value ...]
# jobs/launch_grid.py --emit-sbatch checks everything, writes the plan and renders the job chain
# (preparation -> features -> training arrays -> aggregation, the chain jobs/launch_grid.py submits
# with submitit, with the same options) as results/<grid>/submit.sh: sbatch calls on the
# templates in this folder. This script runs it; read it first to see what will be submitted.
set -euo pipefail
cd "$(dirname "$0")/.."
export SER_HPC_PYTHON=${SER_HPC_PYTHON:-$(command -v python3 || command -v python)}
script=$("$SER_HPC_PYTHON" jobs/launch_grid.py "$@" --cluster slurm --emit-sbatch)
bash "$script"
