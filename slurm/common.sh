# shellcheck shell=bash
# Shared launch helper, sourced by the sbatch templates (slurm/pretrain_*.sh) inside the job.
# Everything that differs between clusters comes from environment variables (see docs/slurm.md):
#
#   ALBEF_DATA_ROOT    (required) folder with the training shards; exported to train.py
#   ALBEF_OUTPUT_ROOT  runs go to $ALBEF_OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID   [$ALBEF_REPO/output]
#   ALBEF_OUTPUT_DIR   exact run folder instead (e.g. to continue an older job's run)
#   ALBEF_VENV         virtualenv to activate on every node ("none": use the PATH's python) [$ALBEF_REPO/.venv]
#   ALBEF_CONFIG       model/data/train yaml; a --config argument wins   [set by the template]
#   ALBEF_DS_CONFIG    DeepSpeed json; a --deepspeed argument wins        [ds_configs/zero2.json]
#   ALBEF_EXTRA        extra train.py arguments, e.g. "--max_steps 100 train.lr=2e-4"
#   ALBEF_LAUNCHER     srun (one task per GPU) or mpirun (MPICH hydra over the allocation) [srun]
#   ALBEF_MAX_RESTARTS give up instead of requeueing after this many restarts  [50]
#   ALBEF_REPO         repository checkout on a shared file system  [$SLURM_SUBMIT_DIR]
# Arguments given to the template (sbatch slurm/pretrain_4m.sh ARGS...) are passed on to train.py.
set -euo pipefail

say() { echo "[albef $(date +%T)] $*"; }
fail() { echo "[albef] ERROR: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a Slurm job: submit with sbatch (see docs/slurm.md)"
ALBEF_REPO=${ALBEF_REPO:-$SLURM_SUBMIT_DIR}

# --- fail-fast checks: each stops here, seconds after the job starts, naming what to set ---
[[ -n ${ALBEF_DATA_ROOT:-} ]] || fail "ALBEF_DATA_ROOT is not set: export ALBEF_DATA_ROOT=/path/to/shards before sbatch"
[[ -d $ALBEF_DATA_ROOT ]] || fail "ALBEF_DATA_ROOT=$ALBEF_DATA_ROOT does not exist on ${SLURMD_NODENAME:-$(hostname)}: set ALBEF_DATA_ROOT to the shard folder (on a shared file system)"
export ALBEF_DATA_ROOT

ALBEF_VENV=${ALBEF_VENV:-$ALBEF_REPO/.venv}
if [[ $ALBEF_VENV != none ]]; then
    [[ -f $ALBEF_VENV/bin/activate ]] || fail "ALBEF_VENV=$ALBEF_VENV is not a virtualenv: set ALBEF_VENV (or ALBEF_VENV=none to use the python on PATH)"
    # shellcheck disable=SC1091
    source "$ALBEF_VENV/bin/activate"   # srun passes the environment (PATH) on to every task
    # DeepSpeed's JIT ops are built into the venv at install (Makefile, tools/prebuild_ops.py).
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ALBEF_VENV/torch_extensions}
fi

cd "$ALBEF_REPO"
[[ -f albef_ds/train.py ]] || fail "ALBEF_REPO=$ALBEF_REPO has no albef_ds/train.py: submit from the repo root or set ALBEF_REPO"
# train.py's arguments: options (--max_steps 100, --resume TAG) first, then the key=value overrides,
# because argparse rejects options after the first override and `--resume` would take a
# following override as its TAG. Our `--resume` (resume if a checkpoint exists) comes first, so a
# --resume TAG of the user's, parsed later, wins. --config/--deepspeed given as arguments replace
# ALBEF_CONFIG/ALBEF_DS_CONFIG, so the checks below read the files train.py will read.
CONFIG=${ALBEF_CONFIG:?the template must set ALBEF_CONFIG}
DS_CONFIG=${ALBEF_DS_CONFIG:-ds_configs/zero2.json}
OPTS=(); OVERRIDES=()
# shellcheck disable=SC2086  # ALBEF_EXTRA is a whitespace-separated list on purpose
set -- ${ALBEF_EXTRA:-} "$@"
while (( $# )); do
    case $1 in
        --config) CONFIG=${2:?--config needs a value}; shift ;;
        --config=*) CONFIG=${1#*=} ;;
        --deepspeed) DS_CONFIG=${2:?--deepspeed needs a value}; shift ;;
        --deepspeed=*) DS_CONFIG=${1#*=} ;;
        -*) OPTS+=("$1") ;;
        *=*) OVERRIDES+=("$1") ;;
        *) OPTS+=("$1") ;;
    esac
    shift
done
[[ -f $CONFIG ]] || fail "config $CONFIG not found (relative to $ALBEF_REPO)"
[[ -f $DS_CONFIG ]] || fail "ds config $DS_CONFIG not found (relative to $ALBEF_REPO)"

# From the nodes this start got: a requeued job can come back on fewer (or more) nodes than it was
# first given, while SLURM_NTASKS keeps the first start's count.
NODES=$SLURM_JOB_NUM_NODES
PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:?sbatch sets SLURM_NTASKS from --nodes x --ntasks-per-node} / NODES ))}
PER_NODE=${PER_NODE%%(*}   # "8(x2)" where Slurm writes a count per node
WORLD=$(( NODES * PER_NODE ))
# Set by --gpus-per-node ("8", or "a100:8" with typed GRES); with --gres=gpu:8 only ON_NODE is.
GPUS=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}; GPUS=${GPUS##*:}
if (( GPUS > 0 && GPUS != PER_NODE )); then
    fail "$PER_NODE tasks per node but $GPUS GPUs per node: one task per GPU, so set --ntasks-per-node=$GPUS"
fi

# DeepSpeed needs train_batch_size = micro batch x grad accum x world size; "auto" entries come
# from the project config (train.batch_size, train.grad_accum), as albef_ds/engine/ds_config.py fills them.
# Checked here, with the config and its overrides, before every node pays for a model build.
python - "$DS_CONFIG" "$CONFIG" "$WORLD" "$NODES" ${OVERRIDES[@]+"${OVERRIDES[@]}"} <<'EOF' || fail "config check failed (above): fix the config/overrides, or make the batch fit --nodes x --ntasks-per-node"
import json, sys
from albef_ds.config import ConfigError, load_config
ds_path, cfg_path, world, nodes, overrides = *sys.argv[1:3], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
try:
    ds, train = json.load(open(ds_path)), load_config(cfg_path, overrides).train
except (ConfigError, ValueError) as exc:   # a typo in an override, a broken json
    sys.exit(f"[albef] {exc}")
pick = lambda key, default: default if ds.get(key, "auto") == "auto" else ds[key]
micro = pick("train_micro_batch_size_per_gpu", train.batch_size)
accum = pick("gradient_accumulation_steps", train.grad_accum)
total = pick("train_batch_size", micro * accum * world)
if total != micro * accum * world:
    sys.exit(f"[albef] {ds_path}: train_batch_size {total} != micro batch {micro} x grad accum {accum}"
             f" x world size {world} ({nodes} nodes x {world // nodes} tasks) = {micro * accum * world}")
EOF

# --- rendezvous: train.py reads these (ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) ---
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Fixed per job, so all ranks agree without talking; below the Linux ephemeral range (32768+).
# A requeued run shifts it, in case the old run's socket is still in TIME_WAIT.
MASTER_PORT=$(( 20000 + (SLURM_JOB_ID + 1000 * ${SLURM_RESTART_COUNT:-0}) % 10000 ))
export MASTER_ADDR MASTER_PORT
# sbatch hands the submitting shell's environment on: a RANK or WORLD_SIZE from a torchrun or
# deepspeed session there would make every task a world of its own (train.py reads them first).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE
# NCCL: the defaults suit most clusters; uncomment what yours needs (docs/slurm.md explains).
# export NCCL_DEBUG=INFO                 # or WARN; INFO prints the chosen transport per rank
# export NCCL_SOCKET_IFNAME=ib0          # interface for bootstrap/sockets; ^lo,docker to exclude
# export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1               # no InfiniBand: use TCP sockets
# export NCCL_IB_GID_INDEX=3             # RoCE clusters usually need this
# export NCCL_IB_TIMEOUT=22              # long fabric hiccups
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# --- output: the job id survives a requeue, so a requeued job resumes in the same folder ---
OUT=${ALBEF_OUTPUT_DIR:-${ALBEF_OUTPUT_ROOT:-$ALBEF_REPO/output}/$SLURM_JOB_NAME-$SLURM_JOB_ID}
mkdir -p "$OUT"
RESTARTS=${SLURM_RESTART_COUNT:-0}
say "job $SLURM_JOB_ID restart $RESTARTS: $NODES nodes ($SLURM_JOB_NODELIST) x $PER_NODE tasks, $GPUS GPUs/node"
say "master $MASTER_ADDR:$MASTER_PORT config $CONFIG ds $DS_CONFIG out $OUT"

ARGS=(albef_ds/train.py --resume --deepspeed "$DS_CONFIG" --config "$CONFIG" --output_dir "$OUT"
      ${OPTS[@]+"${OPTS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"})   # (bash < 4.4 and set -u: empty arrays)
# Each rank names its node in the log, then becomes python (exec: signals reach python itself).
# shellcheck disable=SC2016  # expanded by the rank's bash
BANNER=(bash -c 'echo "[albef] rank ${SLURM_PROCID:-$PMI_RANK} of ${SLURM_NTASKS:-$PMI_SIZE} on $(hostname) ($SLURMD_NODENAME)"; exec "$@"' rank)
case ${ALBEF_LAUNCHER:-srun} in
    # srun: one task per GPU; 22.05 no longer passes --cpus-per-task from sbatch on to srun.
    # --kill-on-bad-exit=0: a rank that exits 124 first must not get the others killed mid-save
    # (they would report 143 and the requeue would be missed).
    srun) LAUNCH=(srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks="$WORLD" --ntasks-per-node="$PER_NODE"
                  --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${BANNER[@]}" python -u) ;;
    # mpirun (MPICH hydra) starts its proxies through srun itself. SLURM_PROCID/NTASKS/LOCALID
    # then describe the proxies, not the ranks, so they are dropped: train.py then takes its rank
    # from mpi4py (PMI_SIZE tells it that mpirun started it).
    mpirun) LAUNCH=(mpirun -np "$WORLD" -ppn "$PER_NODE"
                    env -u SLURM_PROCID -u SLURM_NTASKS -u SLURM_LOCALID "${BANNER[@]}" python -u) ;;
    *) fail "ALBEF_LAUNCHER=$ALBEF_LAUNCHER: use srun or mpirun" ;;
esac

# --- preemption / time limit: train.py saves a checkpoint on SIGUSR1 and exits 124 ---
# The templates ask for --signal=USR1@300 (no "B:"): Slurm then signals every job step, i.e. the
# python ranks directly, and not this shell. Verified on tools/local_cluster.sh: likewise
# `scancel --signal=USR1 JOBID` reaches the ranks; `scancel --signal=USR1 --batch JOBID` (and
# --signal=B:USR1@T) reaches only this shell, which without a trap would die of it, so the trap
# below forwards it to the launcher, which passes it on to the ranks; `--full` reaches both, so
# the ranks may see USR1 twice (their handler must tolerate that).
GOT_USR1=0
# shellcheck disable=SC2317  # called by the trap
forward_usr1() { GOT_USR1=1; say "USR1 on the batch shell: forwarding to the ranks"; kill -USR1 "$PID" 2>/dev/null || true; }
trap forward_usr1 USR1
"${LAUNCH[@]}" "${ARGS[@]}" &
PID=$!
# `wait` returns >128 as soon as a trapped signal arrives; keep waiting while the step runs.
while :; do
    RC=0; wait "$PID" || RC=$?
    if (( RC > 128 )) && kill -0 "$PID" 2>/dev/null; then continue; fi
    break
done
say "training step exited with $RC"

# 124: checkpoint saved. 138 (128+USR1): the ranks died of a USR1 that came before train.py set
# its handler; nothing new was saved, so the requeued run resumes from the previous checkpoint.
if (( RC == 124 || RC == 138 )) || (( GOT_USR1 && RC != 0 )); then
    (( RESTARTS < ${ALBEF_MAX_RESTARTS:-50} )) || fail "restarted $RESTARTS times: not requeueing again (ALBEF_MAX_RESTARTS)"
    say "requeueing job $SLURM_JOB_ID (it resumes from $OUT/checkpoints/latest)"
    # Slurm ends this script (SIGTERM) once the requeue takes effect; the log is appended to.
    scontrol requeue "$SLURM_JOB_ID" || fail "scontrol requeue failed: does the cluster allow requeue (JobRequeue / --requeue)?"
    exit 0
fi
exit "$RC"
