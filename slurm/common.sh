# shellcheck shell=bash
# The body of slurm/smollm2_*.sh (sourced by them after they set RECIPE_CONFIG and RUN_NAME): preflight,
# `srun torchrun` over the allocation, and the USR1 -> save -> requeue cycle. Not meant to be run by itself.
#
# Settings (environment variables; every one has a default):
#   NANOTRONIX_DIR  the nanotronix checkout             default: found from the submitted script's path
#   PYTHON          interpreter with nanotronix + torch default: $NANOTRONIX_DIR/.venv/bin/python, else python3
#   CONFIG          the run's YAML                      default: the recipe of the script (examples/configs/)
#   DATA_ROOT       folder of the token stores          default: unset (the config's data.root is kept)
#                   (passed as data.root=...: the recipes' dataset paths are relative to it)
#   RUN_DIR         the run's folder                    default: $SLURM_SUBMIT_DIR/runs/$RUN_NAME
#   CKPT_DIR        checkpoints                         default: $RUN_DIR/checkpoints
#   LOG_DIR         metrics.jsonl (+ tensorboard)       default: $RUN_DIR/logs
#   GPUS_PER_NODE   GPUs per node; 0 = CPU run (gloo)   default: 8
#   NPROC_PER_NODE  processes per node                  default: GPUS_PER_NODE (1 when GPUS_PER_NODE=0)
#   OVERRIDES       extra dotted overrides, space- or newline-separated, applied last (e.g. "train.train_steps=1000
#                   parallel.tp=2"); write list values without spaces: optimizer.betas=[0.9,0.95]
#   MASTER_PORT     rendezvous port on the first node   default: 20000 + job id mod 12000 (below Linux's
#                   ephemeral ports, 32768-60999, which the node's outgoing connections take)
#   REQUEUE_ON_FAILURE  1: a failed job step that committed a checkpoint requeues the job   default: 1
#   NCCL_* / TORCH_NCCL_* / TORCH_FR_*   passed through; unset ones get the defaults set below
# Nodes, time limit, partition, account: sbatch's own flags or SBATCH_* variables, which override the #SBATCH
# lines (`sbatch --nodes=4 --time=12:00:00 slurm/smollm2_1p7b.sh`, `SBATCH_TIMELIMIT=12:00:00`).
# CPU-only cluster (no GPUs to request): SBATCH_GRES=none GPUS_PER_NODE=0 NPROC_PER_NODE=N sbatch ...
#
# Preemption and time limits. #SBATCH --signal=B:USR1@600 makes Slurm send USR1 to this batch shell 10 minutes
# before the time limit (so does `scancel --signal=USR1 --batch JOBID`). The trap below forwards it to srun,
# which passes it to every process of the job step on every node. The trainer's handler finishes the current
# step, saves a checkpoint on all ranks and exits with 75 (nanotronix.train.EXIT_PREEMPTED); each node's torchrun
# (run as `python -m nanotronix.launch`) then says so in one line and exits 75, not with a failure report.
# torchrun's agent must NOT act on USR1: it would die (USR1's default action), or, when told to handle it, shut the
# workers down with a 30 s SIGKILL deadline that a large checkpoint may not meet. So the agent is started with USR1
# ignored (`trap '' USR1; exec ...`); an ignored signal stays ignored across exec and fork, so workers start ignoring it
# too until the trainer installs its handler: a USR1 in a worker's first seconds is ignored rather than killing it, and
# the script repeats the USR1 every 10 s until the step ends. This relies on Slurm signalling every process of the
# step (proctrack/cgroup and proctrack/linuxproc do; proctrack/pgid would miss the workers, which torchrun starts in
# their own sessions).
# When srun has ended after a USR1, the script runs `scontrol requeue`: the job goes back to the queue with the
# same id and SLURM_RESTART_COUNT+1, and checkpoint.resume=auto continues from the latest checkpoint. Slurm
# holds a requeued job for about two minutes before it can start again (Reason=BeginTime). A job submitted with
# `sbatch --no-requeue` is not requeued: the script says so and exits 75 (resubmit it to continue).
# A job step that fails without a USR1 (a node or GPU lost, a hung collective aborted, a process killed) requeues
# the job the same way, but only if it committed a checkpoint newer than the one it started from: a failure that
# repeats before the next checkpoint (a diverging loss, a bad input met at the same step) then stops after one
# rerun instead of looping. REQUEUE_ON_FAILURE=0 turns this off. A finished run (exit 0) is not requeued. A
# node that fails with this batch shell on it takes the shell with it: Slurm itself requeues that (--requeue).

set -uo pipefail  # not -e: failures are handled explicitly, and `wait` returns >128 when a trap fires

# No $( ) command substitution in this file: bash 5.2 finds the end of a $( ) by re-running its parser as it expands
# it, and runs a pending trap (Slurm's TERM, a USR1) from inside that parser, which then fails to parse the trap
# ("trap: line 2: unexpected EOF while looking for matching `)'") and the command it was in: the handler never ran
# and the shell went on without it, or hung (seen in CI: a scancel as the job started). Values come from functions
# that set a variable (printf -v) and from backquotes, which bash delimits by a plain scan. (Arithmetic $(( )) is
# not parsed so.) tests/test_slurm_scripts_static.py keeps it so.
log() { printf '[nanotronix-slurm %(%F %T)T] %s\n' -1 "$*"; }
fail() { echo "error: $*" >&2; exit 2; }
# This job's own record from scontrol, one line, into JOB_RECORD (empty, and a failure, where there is none): a job
# array's task that runs under the array's id (its last) is shown with every task of the array, a het job's leader
# with every component, whose states, restart counts and reasons are not this job's. None outside a job (the early
# TERM trap below may run before the script checks that).
read_job_record() {
  JOB_RECORD=
  [ -n "${SLURM_JOB_ID:-}" ] || return 1
  JOB_RECORD=`scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | grep "^JobId=$SLURM_JOB_ID "`
}
# The record is read with globs, not =~: the TERM and USR1 handlers read it, and an =~ in a handler replaced
# BASH_REMATCH under the main shell's feet (a trap runs between two commands: between an =~ and the line that reads
# its BASH_REMATCH). The handlers' other =~ run in subshells.
# Whether JOB_RECORD has the field $1 (NAME=VALUE).
record_has() { case " $JOB_RECORD " in *[[:space:]]"$1"[[:space:]]*) return 0 ;; *) return 1 ;; esac; }
# Whether JOB_RECORD says that Slurm is requeueing this job (`scontrol requeue`, a preemption in REQUEUE mode): Slurm
# counts the restart before it sends the TERM.
requeued_by_slurm() {
  local restarts=" $JOB_RECORD "
  [[ "$restarts" == *[[:space:]]Restarts=* ]] || return 1
  restarts=${restarts#*[[:space:]]Restarts=}
  restarts=${restarts%%[!0-9]*}
  [ -n "$restarts" ] && [ "$((10#$restarts))" -gt "${SLURM_RESTART_COUNT:-0}" ] 2>/dev/null
}
# A TERM (scancel, a requeue) before the handlers below are in place (the script's checks and its config read, about
# half a second): nothing has been started. Said, where the shell ended without a line; a requeue says that Slurm
# brings the job back, as on_term does (the two functions above are defined first for it).
on_early_term() {
  read_job_record
  if requeued_by_slurm; then
    log "TERM as the job started: training was not started; Slurm requeues the job, which resumes from its latest" \
        "checkpoint"
  else
    log "TERM as the job started: training was not started (nothing was saved)"
  fi
  exit 2
}
trap on_early_term TERM
EARLY_USR1=0  # ... and a USR1 then (bash's default would end the shell without a line) is taken once on_usr1 is set
trap 'EARLY_USR1=1' USR1

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a Slurm job: submit this script with sbatch"

# ---- settings -------------------------------------------------------------------------------------------
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$NANOTRONIX_DIR/.venv/bin/python" ]; then PYTHON=$NANOTRONIX_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
# A leading `~` or `~user` that reached the job unexpanded (`sbatch --export=ALL,RUN_DIR=~/x`, a quoted "~/x") is
# expanded here as the trainer expands it (os.path.expanduser): left as written, this script's folders and the
# checkpoints it reads to decide on a requeue were a literal `./~` beside the trainer's.
# Sets the variable named $1 to the path $2 so expanded.
expand_home() {
  local user rest home
  printf -v "$1" '%s' "$2"
  [[ "$2" =~ ^~([^/]*)(/.*)?$ ]] || return 0
  user=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
  if [ -z "$user" ]; then home=${HOME:-}; else home=`getent passwd "$user" | cut -d: -f6`; fi
  [ -z "$home" ] || printf -v "$1" '%s%s' "$home" "$rest"  # no such user: kept, as expanduser keeps it
}
expand_home CONFIG "${CONFIG:-$RECIPE_CONFIG}"
expand_home DATA_ROOT "${DATA_ROOT:-}"
expand_home RUN_DIR "${RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$RUN_NAME}"
expand_home CKPT_DIR "${CKPT_DIR:-$RUN_DIR/checkpoints}"
expand_home LOG_DIR "${LOG_DIR:-$RUN_DIR/logs}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
OVERRIDES=${OVERRIDES:-}
REQUEUE_ON_FAILURE=${REQUEUE_ON_FAILURE:-1}
NNODES=${SLURM_JOB_NUM_NODES:-1}

# ---- checks that need no Python (each fails the job at once with one line) -------------------------------
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || fail "GPUS_PER_NODE=$GPUS_PER_NODE is not a number"
if [ "$GPUS_PER_NODE" -eq 0 ]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  DEVICE=cpu
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
  DEVICE=cuda
fi
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || fail "NPROC_PER_NODE=$NPROC_PER_NODE is not a positive number"
if [ "$DEVICE" = cuda ] && [ "$NPROC_PER_NODE" -gt "$GPUS_PER_NODE" ]; then
  fail "NPROC_PER_NODE=$NPROC_PER_NODE is more than GPUS_PER_NODE=$GPUS_PER_NODE"
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON=$PYTHON is not an executable"
[ -f "$CONFIG" ] || fail "CONFIG=$CONFIG: no such file"
[ -z "$DATA_ROOT" ] || [ -d "$DATA_ROOT" ] || fail "DATA_ROOT=$DATA_ROOT: no such directory"
[[ "${MASTER_PORT:-}" =~ ^[0-9]*$ ]] || fail "MASTER_PORT=$MASTER_PORT is not a number"
[ -z "${MASTER_PORT:-}" ] || { [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ]; } \
  || fail "MASTER_PORT=$MASTER_PORT is not a TCP port (1-65535)"
[[ "$REQUEUE_ON_FAILURE" =~ ^[01]$ ]] || fail "REQUEUE_ON_FAILURE=$REQUEUE_ON_FAILURE is not 0 or 1"
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
# The node this batch script runs on (Slurm's name for it, which the other nodes resolve): the rendezvous store
# below runs here. (Slurm runs the script on the allocation's first node.)
MASTER_ADDR=${SLURMD_NODENAME:-}
[ -n "$MASTER_ADDR" ] || MASTER_ADDR=`scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1`
[ -n "$MASTER_ADDR" ] || fail "cannot resolve the first node of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"

# The checkout is importable even when nanotronix is not installed into $PYTHON.
export PYTHONPATH=$NANOTRONIX_DIR${PYTHONPATH:+:$PYTHONPATH}

# Resume: auto, so that a requeued job continues from its own latest checkpoint, unless the config names a
# checkpoint to start from (a branch off another run, e.g. smollm2_1p7b_anneal_math.yaml): the trainer then starts
# from it while CKPT_DIR is empty and continues from CKPT_DIR's latest once it is not. (A config it cannot read
# falls back to auto; the preflight below says what is wrong with it.)
CONFIG_RESUME=`"$PYTHON" -c 'import sys; from nanotronix.config import load_config
print(load_config(sys.argv[1]).checkpoint.resume.strip())' "$CONFIG" 2>/dev/null` || CONFIG_RESUME=auto
case "$CONFIG_RESUME" in auto|none|"") RESUME=auto ;; *) RESUME=$CONFIG_RESUME ;; esac

# Overrides: the script's (where the run lives, resume, device), then the user's, which win.
read -r -d "" -a USER_OVERRIDES <<<"$OVERRIDES"  # every line (-d ""): read stops at the first newline otherwise
for override in ${USER_OVERRIDES[@]+"${USER_OVERRIDES[@]}"}; do
  # The script reads CKPT_DIR to decide whether a failed step made progress (and requeues): the folders are its.
  case "$override" in
    checkpoint.dir=*) fail "OVERRIDES sets checkpoint.dir: set CKPT_DIR instead (this script reads that folder)" ;;
    # Every allocation after the first would find the run's own checkpoints there and be refused.
    checkpoint.resume=none|checkpoint.resume=\"none\"|checkpoint.resume=\'none\')
      fail "OVERRIDES sets checkpoint.resume=none: a requeued job would refuse its own checkpoints in CKPT_DIR; to" \
           "start afresh, give the run an empty CKPT_DIR (or another RUN_DIR): auto starts from scratch there" ;;
    logging.dir=*) fail "OVERRIDES sets logging.dir: set LOG_DIR instead" ;;
    checkpoint=*|logging=*) fail "OVERRIDES replaces the whole ${override%%=*} section (and its folder): set its keys" \
                                 "one by one (e.g. checkpoint.interval=500), the folders with CKPT_DIR and LOG_DIR" ;;
    *=*) ;;
    *) fail "OVERRIDES: '$override' is not dotted.key=value (OVERRIDES is split at spaces and newlines: write" \
            "a list without spaces, e.g. validation.data=[a,b])" ;;
  esac
done
# The folders as YAML single-quoted strings: an override's value is YAML, which read `/runs/exp #2` as `/runs/exp`
# (the rest a comment: the checkpoints went to another run's folder) and `/runs/a: b` as a mapping.
add_folder_override() { local quote="'"; RUN_OVERRIDES+=("$1='${2//$quote/$quote$quote}'"); }
RUN_OVERRIDES=()
add_folder_override checkpoint.dir "$CKPT_DIR"
add_folder_override checkpoint.resume "$RESUME"
add_folder_override logging.dir "$LOG_DIR"
RUN_OVERRIDES+=(train.device="$DEVICE")
[ -z "$DATA_ROOT" ] || add_folder_override data.root "$DATA_ROOT"
RUN_OVERRIDES+=(${USER_OVERRIDES[@]+"${USER_OVERRIDES[@]}"})  # (empty-array safe under set -u in bash < 4.4)

RESTART=${SLURM_RESTART_COUNT:-0}
JOB_LOG_DIR=$RUN_DIR/slurm/job-$SLURM_JOB_ID-restart-$RESTART
MKDIR_ERROR=`mkdir -p "$JOB_LOG_DIR" 2>&1` || fail "cannot create $JOB_LOG_DIR: ${MKDIR_ERROR##*: }"

# ---- NCCL / PyTorch distributed defaults for H100 nodes on InfiniBand (values already set win) --------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# IB retransmission timeout 4.096 us * 2^22 ~ 17 s per retry: rides out short link flaps instead of killing
# the communicator (set NCCL_IB_HCA / NCCL_SOCKET_IFNAME for your fabric if NCCL picks the wrong devices).
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# A failed or hung collective aborts the process (the job ends; resume from the last checkpoint) ...
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# ... after every rank dumps its last collectives, so the log says which rank stopped and where.
# (The flight recorder; TORCH_FR_* are the current names of TORCH_NCCL_TRACE_BUFFER_SIZE / _DEBUG_INFO_TEMP_FILE.)
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$JOB_LOG_DIR/nccl_trace_rank_}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart $RESTART: $NNODES node(s) [$SLURM_JOB_NODELIST] x" \
    "$NPROC_PER_NODE process(es) on $DEVICE; config $CONFIG; run dir $RUN_DIR (checkpoints $CKPT_DIR, metrics" \
    "$LOG_DIR, this job's logs $JOB_LOG_DIR)"

# ---- preemption: USR1 -> the trainer saves -> requeue -------------------------------------------------------
# Whether Slurm refuses to requeue this job (`sbatch --no-requeue`, which wins over the #SBATCH --requeue line):
# asked before saying "requeueing", which `scontrol requeue` would then refuse ("presently disabled").
NO_REQUEUE="the job was submitted with --no-requeue"
requeue_disabled() { read_job_record && record_has Requeue=0; }
# (read_job_record, record_has: at the top.)
# Whether Slurm is ending this job (scancel, the time limit, a preemption or requeue), as scontrol says its state.
job_ending() {
  local state
  read_job_record || return 1
  for state in CANCELLED COMPLETING TIMEOUT PREEMPTED REQUEUED REQUEUE_HOLD PENDING; do
    ! record_has "JobState=$state" || return 0
  done
  return 1
}
PREEMPTED=0
USR1_OF_TIME_LIMIT=0  # whether that USR1 came with no more time left than the lead (see usr1_of_time_limit)
SRUN_PID=""
RESENDER_PID=""
forward_usr1() {
  [ -n "$SRUN_PID" ] || return 0
  kill -USR1 "$SRUN_PID" 2>/dev/null || return 0
  # Again every 10 s while the step runs: a USR1 that reached the workers before the trainer installed its
  # handler was ignored (see above). The trainer's handler only sets a flag, so repeats are harmless; every other
  # process of the step ignores USR1 (torchrun's agents, the rendezvous store). (Every minute, as before, was most of
  # a short lead such as --signal=B:USR1@60.)
  ( while sleep 10 && kill -USR1 "$SRUN_PID" 2>/dev/null; do :; done ) &
  RESENDER_PID=$!
}
# Sets the variable named $1 to Slurm's [D-]HH:MM:SS (or MM:SS) $2 in seconds; fails on anything else (UNLIMITED,
# NOT_SET, INVALID).
slurm_seconds() {
  [[ "$2" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 1
  printf -v "$1" '%d' $(( ((10#${BASH_REMATCH[2]:-0} * 24 + 10#${BASH_REMATCH[4]:-0}) * 60 + 10#${BASH_REMATCH[5]}) \
                          * 60 + 10#${BASH_REMATCH[6]} ))
}
# Sets the variable named $1 to the USR1 lead in seconds (--signal=[{R|B}:]USR1[@TIME], TIME 60 when left out):
# from SBATCH_SIGNAL (sbatch's own variable, which wins over the script's lines) or the last `#SBATCH --signal` line
# of the submitted script ($0 is Slurm's copy of it); fails when neither names USR1. A --signal on sbatch's command
# line is not visible to the job (Slurm shows the lead nowhere: not in scontrol, squeue or the job's environment).
usr1_lead_s() {
  local spec=${SBATCH_SIGNAL:-} line signal_line='^#SBATCH[[:space:]]+--signal[= ]([^[:space:]]*)'
  if [ -z "$spec" ]; then
    while IFS= read -r line || [ -n "$line" ]; do  # (a last line without a newline too)
      [[ ! "$line" =~ $signal_line ]] || spec=${BASH_REMATCH[1]}
    done 2>/dev/null <"$0"
  fi
  [[ "${spec^^}" =~ ^([RB]+:)?(SIG)?(USR1|10)(@([0-9]+))?$ ]] || return 1
  printf -v "$1" '%d' "$((10#${BASH_REMATCH[5]:-60}))"  # (10#: @090 is 90, not an invalid octal number)
}
# Whether a USR1 is the time limit's (--signal=B:USR1@LEAD), not a preemption's, `scancel --signal=USR1`'s or an
# admin's: Slurm sends it once the time left is at most the lead, "up to 60 seconds earlier than specified" (sbatch's
# manual: its time-limit checks run every 30 s), so a USR1 with more time left than that is another's. Only the time
# limit's USR1 repeats at every allocation's start when --time is not above the lead: what the guard below stops.
# Where the lead is not known (a --signal given only on sbatch's command line), the bound is Slurm's largest lead,
# 65535 s: the guard then errs on ending a job rather than requeueing it forever. The README's advice for a short
# job, a shorter --signal on the command line than the script's 600 s, stays within the bound; a longer lead belongs
# in the #SBATCH line or SBATCH_SIGNAL. A time left that squeue cannot say counts for the same reason; none
# (UNLIMITED) does not.
usr1_of_time_limit() {
  local left lead
  # This job's own line (%A: its job id): a job array's task under the array's id is listed with every task.
  left=`squeue -h -j "$SLURM_JOB_ID" -o "%A %L" 2>/dev/null | sed -n "s/^$SLURM_JOB_ID //p"` || return 0
  [ "$left" != UNLIMITED ] || return 1
  slurm_seconds left "$left" || return 0
  usr1_lead_s lead || lead=65535
  [ "$left" -le $((lead + 60)) ]
}
on_usr1() {
  if [ "$PREEMPTED" = 0 ]; then
    PREEMPTED=1
    ! (usr1_of_time_limit) || USR1_OF_TIME_LIMIT=1  # (in a subshell: see record_has)
    local after="the job will requeue itself" lead
    # The time limit's USR1 this early: the allocation trains for less than the lead, every time it is requeued
    # (the guard below ends the job only when an allocation commits nothing; one that saves a few steps goes on)
    if [ "$USR1_OF_TIME_LIMIT" = 1 ] && lead=`usr1_lead_s lead && echo "$lead"` && [ "$SECONDS" -lt "$lead" ]; then
      log "warning: the time limit's USR1 came ${SECONDS} s into this allocation: its --time leaves less than the" \
          "USR1 lead (${lead} s) to train in, in every allocation; give the job a --time well above the lead (the" \
          "lead of SBATCH_SIGNAL or the script's #SBATCH --signal line: a --signal on sbatch's command line is not" \
          "visible to the job)"
    fi
    ! requeue_disabled || after="it will not requeue itself: $NO_REQUEUE"
    log "USR1: asking the trainer to save a checkpoint and stop ($after)"
    forward_usr1
  fi
}
trap on_usr1 USR1
[ "$EARLY_USR1" = 0 ] || on_usr1
# SIGTERM (scancel, the time limit): Slurm signals the job step itself; the shell only waits for srun, and does not
# requeue the job afterwards (the trainer saves on TERM too, which would otherwise look like progress to requeue on:
# a cancelled job would come back). Unless Slurm itself is requeueing the job (`scontrol requeue`, a preemption in
# REQUEUE mode), which it counts before the TERM: the job then comes back by itself (before, the log said it would
# not and to resubmit it, which would have made two jobs of one run).
# After a USR1, a TERM of the time limit (the save took longer than the USR1's lead) leaves the requeue to go on, and
# any other (scancel) stops it: before, a job cancelled while it stopped on USR1 requeued itself all the same.
# Each node's torchrun (nanotronix.launch) says such a stop in one line and exits 75 (its trainers saved) or 143
# (they had not installed their handler yet), where torchrun printed a traceback and exited 1: non-zero either way,
# and what follows the step asks only whether its exit was 0 (the number is only said).
TERMINATED=0
REQUEUED_BY_SLURM=0
TIME_LIMIT=0
on_term() {
  TERMINATED=1
  read_job_record
  ! record_has Reason=TimeLimit || TIME_LIMIT=1
  if requeued_by_slurm; then
    REQUEUED_BY_SLURM=1
    log "TERM: Slurm is requeueing the job (scontrol requeue or a preemption): waiting for the job step to stop;" \
        "the job resumes from the latest checkpoint in $CKPT_DIR"
  elif [ "$PREEMPTED" = 1 ] && [ "$TIME_LIMIT" = 1 ]; then
    log "TERM: the time limit, while the job step stops on USR1: waiting for it (the job will requeue itself)"
  else
    log "TERM: waiting for the job step to stop (the job will not be requeued)"
  fi
}
trap on_term TERM

# ---- the rendezvous store, on this (the first) node, for the job's lifetime --------------------------------
# Hosted here rather than in one of the torchrun agents (nanotronix/rendezvous_store.py says why); it starts
# while the preflight runs, and is checked after it. USR1 is ignored from the start (see preemption above), and so
# is TERM: Slurm's TERM (scancel, the time limit) reaches it with every other process of the job, while the agents
# still report to it until their workers have saved and stopped (gone, it left each agent logging TCPStore errors
# and a C++ stack dump). It ends with this shell (HUP), or with Slurm's SIGKILL after KillWait.
STORE_LOG=$JOB_LOG_DIR/rendezvous_store.log
(trap '' USR1 TERM; exec "$PYTHON" -m nanotronix.rendezvous_store --port "$MASTER_PORT") >"$STORE_LOG" 2>&1 &
STORE_PID=$!
trap 'kill -HUP "$STORE_PID" 2>/dev/null' EXIT

# ---- preflight: config, layout against the allocation, GPUs, token stores, in seconds -----------------------
# As a one-task job step on the first node, so it sees the GPUs (and CPUs) a training step gets: under
# --exclusive the batch shell itself sees every GPU of the node, whatever the job asked for.
# Its output is captured so that a failure shows as its one line, without srun's own "task 0: Exited" notes.
# USR1 is ignored in it, as in the torchrun agents: `scancel --signal=USR1 JOB` (no --batch) signals the job's steps,
# and USR1's default action killed the preflight, which failed the job without a word.
PREFLIGHT_CMD=(srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
  bash -c 'trap "" USR1; exec "$@"' preflight "$PYTHON" -m nanotronix.preflight --config "$CONFIG"
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${RUN_OVERRIDES[@]}")
PREFLIGHT=`"${PREFLIGHT_CMD[@]}" 2>&1`
PREFLIGHT_RC=$?
# Slurm ends a cancelled (or requeued, timed-out) job's steps before it signals this shell: the preflight's step can
# return, stopped, before the TERM arrives here, which then read as the preflight failing (its "CANCELLED" line as
# the error). A failed preflight in a job Slurm is ending waits a moment for that TERM, then takes it as come (a
# state scontrol cannot say is no such job: the preflight's own error stands).
if [ "$PREFLIGHT_RC" != 0 ] && [ "$TERMINATED" = 0 ] && job_ending; then
  for _ in {1..50}; do [ "$TERMINATED" = 0 ] || break; sleep 0.1; done  # the trap runs between two sleeps
  [ "$TERMINATED" = 1 ] || on_term
fi
# Its summary line, then the run's start notes (`note: ...`, the trainer's words): a log line each.
[ "$PREFLIGHT_RC" != 0 ] || while IFS= read -r line; do log "$line"; done <<<"$PREFLIGHT"
# Slurm's TERM (scancel, the time limit, a requeue) during the preflight, which stops its step too (its output is then
# no error), or as it ended (the trap runs once srun has returned, 0 or not): training is not started (before, a TERM
# after a successful preflight launched it all the same). After a USR1, the USR1 paths below say how the job ends
# (the time limit's TERM lets its requeue go on).
if [ "$TERMINATED" = 1 ] && [ "$PREEMPTED" = 0 ]; then
  if [ "$PREFLIGHT_RC" = 0 ]; then WHEN="as the preflight ended"; else WHEN="during the preflight"; fi
  if [ "$REQUEUED_BY_SLURM" = 1 ]; then
    log "the TERM came $WHEN: training was not started; Slurm requeues the job, which resumes from the latest" \
        "checkpoint in $CKPT_DIR"
  else
    log "the TERM came $WHEN: training was not started (nothing was saved)"
  fi
  exit 2
fi
if [ "$PREFLIGHT_RC" != 0 ] && [ "$TERMINATED" = 0 ]; then
  # A preflight killed by a signal (out of memory, a crash in an import) says nothing itself: then srun's note is
  # the reason
  MESSAGE=`grep -v '^srun: ' <<<"$PREFLIGHT"`
  if ! grep -q '[^[:space:]]' <<<"$MESSAGE"; then
    SRUN_SAID=`sed -n 's/^srun: error: //p' <<<"$PREFLIGHT" | head -n 1`
    fail "the preflight ($PYTHON -m nanotronix.preflight) failed without a message (exit $PREFLIGHT_RC:" \
         "${SRUN_SAID:-srun said nothing either})"
  fi
  echo "$MESSAGE" >&2
  exit 2
fi
# (the store's own line already starts with "error: ")
if ! kill -0 "$STORE_PID" 2>/dev/null; then
  STORE_ERROR=`grep -h '^error' "$STORE_LOG" | sed 's/^error: //' | grep .`
  fail "${STORE_ERROR:-the rendezvous store stopped: see $STORE_LOG}"
fi

# ---- train -----------------------------------------------------------------------------------------------
# Sets the variable named $1 to the run's newest committed step (0: none yet), the one the trainer resumes from (a
# step folder holding its manifest; `latest` lags one step behind after a kill between the commit and its update): a
# failure after it moved on has made progress.
latest_step() {
  local newest=0 manifest n
  for manifest in "$CKPT_DIR"/step_*/checkpoint.json; do
    [[ "$manifest" =~ /step_0*([0-9]+)/checkpoint\.json$ && -f "$manifest" ]] || continue
    n=${BASH_REMATCH[1]:-0}
    (( n > newest )) && newest=$n
  done
  printf -v "$1" '%d' "$newest"
}
latest_step STARTED_FROM
# Whether another run holds the trainer's lock on CKPT_DIR now that this job's processes have ended (a job submitted
# twice): a newer step is then that run's progress, not this one's, and requeueing would only repeat the refusal.
# Sets the variable named $1 to what the lock says of its holder.
lock_holder() {
  local lock=$CKPT_DIR/.lock rc=0 holder
  [ -e "$lock" ] || return 1
  flock --nonblock --conflict-exit-code 200 "$lock" true 2>/dev/null || rc=$?
  [ "$rc" = 200 ] || return 1
  holder=`head -c 200 "$lock"`
  printf -v "$1" '%s' "${holder//$'\n'/}"
}
# Whether a job step of this job other than the batch script (`JOBID.N`) still runs; the preflight's has ended.
# squeue names a job array task's steps ARRAYID_TASK.N, and lists every task's under the array's id.
step_running() {
  local mine=$SLURM_JOB_ID
  [ -z "${SLURM_ARRAY_JOB_ID:-}" ] || mine+="|${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}"
  squeue -h --steps --jobs "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -qE "^($mine)\.[0-9]+$"
}
STEP_END_WAIT_S=150  # Slurm's KillWait (30 s by default) and srun's --wait=120 below, with room
RC=0
LAUNCHED=0
if [ "$PREEMPTED" = 0 ]; then
  LAUNCHED=1
  # One torchrun agent per node with all the node's CPUs (srun would otherwise confine it to one);
  # --kill-on-bad-exit=0 and --wait: when one node's processes end, the others get 2 minutes to finish
  # (a checkpoint written on USR1 is a collective) before Slurm stops them.
  # (nanotronix.launch is torchrun that says a planned stop, the workers' exit 75 after a save on USR1 or TERM, in
  # one line and exits 75, instead of torchrun's failure report or traceback and exit 1; any other end is
  # torchrun's own report.)
  TRAIN_CMD=("$PYTHON" -m nanotronix.launch
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_conf=is_host=0 --rdzv_id="$SLURM_JOB_ID"
    --max_restarts=0
    -m nanotronix.train --config "$CONFIG" "${RUN_OVERRIDES[@]}")
  printf '%q ' "${TRAIN_CMD[@]}" >"$JOB_LOG_DIR/command.sh"
  log "launching on every node: $JOB_LOG_DIR/command.sh"
  srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=0 --wait=120 \
    bash -c 'trap "" USR1; exec "$@"' torchrun-with-usr1-ignored "${TRAIN_CMD[@]}" &
  SRUN_PID=$!
  [ "$PREEMPTED" = 0 ] || forward_usr1  # the USR1 came while srun was being started
  while :; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # srun has ended; otherwise a trap interrupted `wait`
  done
  [ -z "$RESENDER_PID" ] || kill "$RESENDER_PID" 2>/dev/null
  # srun itself killed (the OOM killer, a user): it ends at once, while Slurm cancels its job step, whose processes
  # take seconds to stop. Until they have, CKPT_DIR is not final and the step's own trainer holds its lock (before,
  # the job took that for another run's and was not requeued, though it had committed checkpoints).
  # (Said only when it takes a while: a step that ended with srun can still show for a moment.)
  WAITED=0
  while [ "$WAITED" -lt "$STEP_END_WAIT_S" ] && step_running; do
    [ "$WAITED" != 2 ] || log "srun ended (exit $RC) before its job step: waiting for the step's processes to stop"
    sleep 1
    WAITED=$((WAITED + 1))
  done
fi

# After a USR1 the step ends non-zero (the trainer exits 75 after saving, and so does nanotronix.launch then).
# Exit 0 means the run had finished anyway: nothing to requeue.
# Not when another run holds CKPT_DIR's lock (this job's trainer was refused: a requeue would be refused again), nor
# when this allocation and the one before it both got the time limit's USR1 before committing a checkpoint: a --time
# not above the --signal lead sends USR1 during every start-up, and each requeue would stop the same way, forever.
# Other USR1s (a preemption, an admin's) do not count: two of them in a long start-up are no reason to end the job.
# In JOB_LOG_DIR: this allocation was requeued on the time limit's USR1 from step N, without progress.
USR1_MARK=time_limit_usr1_without_progress
if [ "$PREEMPTED" = 1 ] && { [ "$LAUNCHED" = 0 ] || [ "$RC" != 0 ]; }; then
  latest_step REACHED
  if [ "$LAUNCHED" = 1 ]; then WHAT="job step ended (exit $RC) after USR1"; else WHAT="USR1 before training started"; fi
  if [ "$REQUEUED_BY_SLURM" = 1 ]; then
    log "$WHAT and TERM: Slurm requeues the job, which resumes from step $REACHED"
    exit "$RC"
  fi
  if [ "$TERMINATED" = 1 ] && [ "$TIME_LIMIT" = 0 ]; then
    log "$WHAT, then TERM (scancel): not requeued; the latest checkpoint is step $REACHED: resubmit the job to" \
        "continue from it"
    exit "$RC"
  fi
  if [ "$LAUNCHED" = 1 ] && lock_holder HOLDER; then
    log "job step ended (exit $RC) after USR1 while another run holds $CKPT_DIR/.lock (${HOLDER:-holder unknown}):" \
        "not requeued (two jobs cannot train into one CKPT_DIR); wait for that run to end or give this one its own"
    exit "$RC"
  fi
  if [ "$REACHED" -le "$STARTED_FROM" ] && [ "$USR1_OF_TIME_LIMIT" = 1 ]; then
    PREVIOUS=$RUN_DIR/slurm/job-$SLURM_JOB_ID-restart-$((RESTART - 1))/$USR1_MARK
    PREVIOUS_FROM=`cat "$PREVIOUS" 2>/dev/null`
    if [ "$RESTART" -gt 0 ] && [ "$PREVIOUS_FROM" = "$STARTED_FROM" ]; then
      fail "the time limit's USR1 came before a checkpoint in two allocations in a row (still at step" \
           "$STARTED_FROM): not requeued again, the next one would stop the same way; the job's --time must be well" \
           "above the USR1 lead time (#SBATCH --signal=B:USR1@600: 10 minutes; for a short job pass e.g." \
           "--signal=B:USR1@60)"
    fi
    echo "$STARTED_FROM" >"$JOB_LOG_DIR/$USR1_MARK"
  fi
  if requeue_disabled; then
    log "$WHAT: not requeued: $NO_REQUEUE; resubmit it to continue from the latest checkpoint in $CKPT_DIR"
    exit 75
  fi
  log "$WHAT: requeueing job $SLURM_JOB_ID to resume from $CKPT_DIR"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0  # not reached in practice: the requeue ends this shell
  fi
  log "scontrol requeue failed: resubmit the job to continue from the latest checkpoint"
  exit 75
fi
if [ "$RC" != 0 ] && [ "$LAUNCHED" = 1 ]; then
  latest_step REACHED
  if [ "$REQUEUED_BY_SLURM" = 1 ]; then
    log "job step ended (exit $RC) after TERM: Slurm requeues the job, which resumes from step $REACHED"
  elif [ "$TERMINATED" = 1 ]; then
    log "job step ended (exit $RC) after TERM (scancel or the time limit): not requeued; the latest checkpoint" \
        "is step $REACHED: resubmit the job to continue from it"
  elif [ "$REQUEUE_ON_FAILURE" = 1 ] && lock_holder HOLDER; then
    log "job step failed (exit $RC) while another run holds $CKPT_DIR/.lock (${HOLDER:-holder unknown}): not" \
        "requeued (two jobs cannot train into one CKPT_DIR); wait for that run to end or give this one its own"
  elif [ "$REQUEUE_ON_FAILURE" = 1 ] && [ "$REACHED" -gt "$STARTED_FROM" ] && requeue_disabled; then
    log "job step failed (exit $RC) after committing the checkpoint of step $REACHED: not requeued: $NO_REQUEUE;" \
        "resubmit it to continue from that checkpoint"
  elif [ "$REQUEUE_ON_FAILURE" = 1 ] && [ "$REACHED" -gt "$STARTED_FROM" ]; then
    log "job step failed (exit $RC) after committing the checkpoint of step $REACHED (this allocation started" \
        "from step $STARTED_FROM): requeueing job $SLURM_JOB_ID to resume from it"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    log "scontrol requeue failed: resubmit the job to continue from the latest checkpoint"
  elif [ "$REQUEUE_ON_FAILURE" = 1 ]; then
    log "job step failed (exit $RC) without committing a checkpoint after step $STARTED_FROM: not requeued (a" \
        "failure before any progress could repeat at every requeue); see the errors above (a process killed by" \
        "the OOM killer or a user shows in torchrun's report as a signal, e.g. exitcode -9), then resubmit"
  else
    log "job step failed (exit $RC): not requeued (REQUEUE_ON_FAILURE=0); the latest checkpoint is step $REACHED:" \
        "resubmit the job to continue from it"
  fi
fi
log "job step ended with exit code $RC"
exit "$RC"
