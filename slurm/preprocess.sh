#!/bin/bash
# Tokenize a corpus on many machines: one Slurm job array, each task running tools/preprocess.py on its share of
# the inputs (`--shard I/N`: the I-th of N contiguous runs of the sorted inputs, holding like amounts of text; large
# JSON-lines (also .gz/.zst) and Parquet files are cut between tasks).
#
#   INPUT=/raw/fineweb-edu TOKENIZER=/models/smollm2/tokenizer.json OUTPUT=/corpus/fineweb-edu \
#     sbatch --array=0-63 slurm/preprocess.sh
#
# Each task writes OUTPUT/shard-IIIII-of-NNNNN (.bin/.idx/.meta.json); once all N are there, the folder OUTPUT is
# one token store (a dataset path of the recipes, `tools/inspect_store.py OUTPUT --verify`) whose token stream is
# exactly what a single `tools/preprocess.py` over the same inputs writes. Task I writes shard I; N is SHARDS, by
# default the array's size (--array=0-(N-1)). A failed task leaves its shard missing, and the folder refuses to
# open until that task is rerun with the same settings and N: `SHARDS=64 sbatch --array=17 slurm/preprocess.sh`.
# A task whose shard is already complete from the same inputs, tokenizer and settings succeeds at once (so the whole
# array may be resubmitted); one of other settings stops with one line, and EXTRA_ARGS=--overwrite replaces it.
#
# Settings (environment variables):
#   INPUT        input files or folders, space-separated (.jsonl[.gz|.zst], .parquet, text)   required
#   TOKENIZER    tokenizer.json, a folder holding one, or a Hub id                            required
#   OUTPUT       the sharded store's folder                                                   required
#   SHARDS       N, the number of shards                              default: the array's size (its max index + 1)
#   EXTRA_ARGS   more tools/preprocess.py options, e.g. "--shuffle --text-key content"       default: none
#   NANOTRONIX_DIR, PYTHON   as for slurm/smollm2_*.sh (slurm/common.sh)
# Workers: the task's CPUs (--cpus-per-task below, or sbatch --cpus-per-task=N).
#
#SBATCH --job-name=preprocess
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.out

fail() { echo "error: $*" >&2; exit 2; }

# Find the checkout: sbatch runs a copy of this script from Slurm's spool folder, so its own path is useless.
if [ -z "${NANOTRONIX_DIR:-}" ]; then
  submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\(.*\.sh\)\( .*\)\{0,1\}$/\1/p' | head -n 1)
  for dir in "$(dirname "$(dirname "${submitted:-.}")")" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$(dirname "$0")")"; do
    if [ -n "$dir" ] && [ -f "$dir/slurm/common.sh" ]; then NANOTRONIX_DIR=$(cd "$dir" && pwd); break; fi
  done
fi
[ -f "${NANOTRONIX_DIR:-}/tools/preprocess.py" ] || fail "cannot find the nanotronix checkout: set NANOTRONIX_DIR"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$NANOTRONIX_DIR/.venv/bin/python" ]; then PYTHON=$NANOTRONIX_DIR/.venv/bin/python; else PYTHON=python3; fi
fi

[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || fail "not a job array task: submit with sbatch --array=0-(N-1) slurm/preprocess.sh"
[ -n "${INPUT:-}" ] || fail "INPUT is not set (input files or folders)"
[ -n "${TOKENIZER:-}" ] || fail "TOKENIZER is not set"
[ -n "${OUTPUT:-}" ] || fail "OUTPUT is not set (the sharded store's folder)"
shards=${SHARDS:-$(( ${SLURM_ARRAY_TASK_MAX:-0} + 1 ))}
[[ "$shards" =~ ^[0-9]+$ ]] && [ "$shards" -ge 1 ] || fail "SHARDS=$shards is not a positive number"
shards=$((10#$shards))  # SHARDS=08: bash arithmetic reads a leading 0 as octal ("value too great for base")
[ "$SLURM_ARRAY_TASK_ID" -lt "$shards" ] \
  || fail "array task $SLURM_ARRAY_TASK_ID is not a shard of $shards: give --array within 0-$(( shards - 1 ))"
if [ -z "${SHARDS:-}" ] && [ "${SLURM_ARRAY_TASK_COUNT:-$shards}" != "$shards" ]; then
  fail "the array is not 0-$(( shards - 1 )) (it has ${SLURM_ARRAY_TASK_COUNT} tasks): set SHARDS=N for a partial array"
fi
shard=$SLURM_ARRAY_TASK_ID
count=$shards

echo "[nanotronix-preprocess $(date '+%F %T')] shard $shard/$count on $(hostname), ${SLURM_CPUS_PER_TASK:-1} workers"
# shellcheck disable=SC2086  # INPUT and EXTRA_ARGS are word lists
exec "$PYTHON" "$NANOTRONIX_DIR/tools/preprocess.py" --input $INPUT --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT" \
  --shard "$shard/$count" --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress ${EXTRA_ARGS:-}
