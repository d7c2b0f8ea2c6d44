#!/bin/bash
# Submit a grid by hand with plain sbatch (no submitit on the login node needed at run time):
#   slurm/submit_grid.sh configs/grid/emospeech2024.yaml [--profile P.yaml] [key=value ...]
# jobs/launch_grid.py --emit-sbatch checks everything, writes the plan and a file of
# shell-quoted sbatch arguments; this script submits the array and the aggregation job.
set -euo pipefail
cd "$(dirname "$0")/.."
export SER_HPC_PYTHON=${SER_HPC_PYTHON:-$(command -v python3 || command -v python)}
env_file=$("$SER_HPC_PYTHON" jobs/launch_grid.py "$@" --cluster slurm --emit-sbatch)
# shellcheck disable=SC1090  # defines RESULTS PLAN ARRAY PREPARE FEATURES TRAIN_ARGS PREP_ARGS FEAT_ARGS AGG_ARGS SER_HPC_JOB_SETUP
source "$env_file"
export SER_HPC_JOB_SETUP
agg_dep=()
train_dep=()
if [[ -n "$PREPARE" && -n "$ARRAY" ]]; then
  # Decode the audio once; if that fails the array is cancelled and aggregation reports it.
  prep=$(sbatch --parsable "${PREP_ARGS[@]}" --output="$RESULTS/logs/%j_prepare.out" slurm/prepare.sbatch "$PLAN")
  prep=${prep%%;*}
  echo "data preparation: $prep"
  train_dep=(--dependency="afterok:$prep" --kill-on-invalid-dep=yes)
fi
if [[ -n "$FEATURES" && -n "$ARRAY" ]]; then
  # Each frozen backbone pair runs once over the corpus (train.features=cached); training waits for all.
  feat=$(sbatch --parsable --array="$FEATURES" "${train_dep[@]}" "${FEAT_ARGS[@]}" \
         --output="$RESULTS/logs/%A_%a_features.out" slurm/features.sbatch "$PLAN")
  feat=${feat%%;*}
  echo "feature extraction: $feat"
  train_dep=(--dependency="afterok:$feat" --kill-on-invalid-dep=yes)
fi
if [[ -n "$ARRAY" ]]; then
  train=$(sbatch --parsable --array="$ARRAY" "${train_dep[@]}" "${TRAIN_ARGS[@]}" --output="$RESULTS/logs/%A_%a.out" \
          slurm/train_array.sbatch "$PLAN")
  train=${train%%;*}
  echo "train array: $train"
  agg_dep=(--dependency="afterany:$train")
else
  echo "every run is finished: only aggregating"
fi
agg=$(sbatch --parsable "${agg_dep[@]}" "${AGG_ARGS[@]}" --output="$RESULTS/logs/%j_aggregate.out" \
      slurm/aggregate.sbatch "$RESULTS")
echo "aggregation: ${agg%%;*}"
echo "results: $RESULTS"
