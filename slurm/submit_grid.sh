#!/bin/bash
# Submit a grid by hand with plain sbatch (no submitit on the login node needed at run time):
#   slurm/submit_grid.sh configs/grid/emospeech2024.yaml [--profile P.yaml] [key=value ...]
# jobs/launch_grid.py --emit-sbatch checks everything, writes the plan and a file of
# shell-quoted sbatch arguments; this script submits the array and the aggregation job.
# A grid with more packs than the cluster's MaxArraySize is submitted as several arrays
# (task i of array k trains pack TRAIN_OFFSETS[k] + i); aggregation waits for all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
export SER_HPC_PYTHON=${SER_HPC_PYTHON:-$(command -v python3 || command -v python)}
env_file=$("$SER_HPC_PYTHON" jobs/launch_grid.py "$@" --cluster slurm --emit-sbatch)
# shellcheck disable=SC1090  # defines RESULTS PLAN ARRAY PREPARE FEATURES TRAIN_ARRAYS TRAIN_OFFSETS
# FEATURE_ARRAYS FEATURE_OFFSETS TRAIN_ARGS PREP_ARGS FEAT_ARGS AGG_ARGS SER_HPC_JOB_SETUP
source "$env_file"
export SER_HPC_JOB_SETUP
agg_dep=()
train_dep=()
# The log of task i of an array at offset N is <array>_<i>+N.out (jobs/status.py reads the pack from it).
log_name() { if [[ $1 == 0 ]]; then echo "$2.out"; else echo "$2+$1.out"; fi; }
if [[ -n "$PREPARE" && -n "$ARRAY" ]]; then
  # Decode the audio once; if that fails the array is cancelled and aggregation reports it.
  prep=$(sbatch --parsable "${PREP_ARGS[@]}" --output="$RESULTS/logs/%j_prepare.out" slurm/prepare.sbatch "$PLAN")
  prep=${prep%%;*}
  echo "data preparation: $prep"
  train_dep=(--dependency="afterok:$prep" --kill-on-invalid-dep=yes)
fi
if [[ -n "$FEATURES" && -n "$ARRAY" ]]; then
  # Each frozen backbone pair runs once over the corpus (train.features=cached); training waits for all.
  feats=""
  for k in "${!FEATURE_ARRAYS[@]}"; do
    off=${FEATURE_OFFSETS[$k]}
    feat=$(sbatch --parsable --array="${FEATURE_ARRAYS[$k]}" "${train_dep[@]}" "${FEAT_ARGS[@]}" \
           --output="$RESULTS/logs/$(log_name "$off" "%A_%a_features")" slurm/features.sbatch "$PLAN" "$off")
    feat=${feat%%;*}
    echo "feature extraction: $feat"
    feats+=":$feat"
  done
  train_dep=(--dependency="afterok$feats" --kill-on-invalid-dep=yes)
fi
if [[ -n "$ARRAY" ]]; then
  trains=""
  for k in "${!TRAIN_ARRAYS[@]}"; do
    off=${TRAIN_OFFSETS[$k]}
    train=$(sbatch --parsable --array="${TRAIN_ARRAYS[$k]}" "${train_dep[@]}" "${TRAIN_ARGS[@]}" \
            --output="$RESULTS/logs/$(log_name "$off" "%A_%a")" slurm/train_array.sbatch "$PLAN" "$off")
    train=${train%%;*}
    if [[ $off == 0 ]]; then echo "train array: $train"; else echo "train array: $train (task i = pack $off + i)"; fi
    trains+=":$train"
  done
  agg_dep=(--dependency="afterany$trains")
else
  echo "every run is finished: only aggregating"
fi
agg=$(sbatch --parsable "${agg_dep[@]}" "${AGG_ARGS[@]}" --output="$RESULTS/logs/%j_aggregate.out" \
      slurm/aggregate.sbatch "$RESULTS")
echo "aggregation: ${agg%%;*}"
echo "results: $RESULTS"
