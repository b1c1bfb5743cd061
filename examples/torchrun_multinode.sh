#!/usr/bin/env bash
# Start disco_megatron.train on this node with torchrun (static rendezvous); run it once per node.
# It is also what examples/slurm/pretrain.sbatch runs on every node, so the torchrun command is built
# in this one place.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 NPROC_PER_NODE=8 \
#       examples/torchrun_multinode.sh --tensor-model-parallel-size 8 --run-dir runs/demo
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (default $SLURM_NODEID under srun, else 0)
#   MASTER_ADDR     address of node rank 0 (default 127.0.0.1)
#   MASTER_PORT     free TCP port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE  processes (GPUs) on this node (default: GPUs nvidia-smi lists, else 1)
#   RUN_DIR         optional; passes --run-dir RUN_DIR and, when RUN_DIR/checkpoints holds a
#                   latest_checkpointed_iteration.txt pointer, --load RUN_DIR/checkpoints (resume)
#   TORCHRUN        launcher command (default torchrun)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives its workers to checkpoint after forwarding them a
#                   SIGTERM/SIGUSR1 before it kills them (default 100; pretrain.sbatch signals 120 s early)
#   DRY_RUN=1       print the command instead of running it
# Arguments are training flags for python -m disco_megatron.train (Megatron-LM names).
set -euo pipefail

die() {
    echo "torchrun_multinode.sh: $*" >&2
    exit 2
}

require_int() {
    local name=$1 value=$2 min=$3
    if ! [[ $value =~ ^(0|[1-9][0-9]*)$ ]] || ((value < min)); then
        die "$name=$value: expected an integer >= $min"
    fi
}

default_nproc() {
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo $((count > 0 ? count : 1))
}

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(default_nproc)}"
TORCHRUN="${TORCHRUN:-torchrun}"

require_int NNODES "$NNODES" 1
require_int NODE_RANK "$NODE_RANK" 0
require_int NPROC_PER_NODE "$NPROC_PER_NODE" 1
require_int MASTER_PORT "$MASTER_PORT" 1
((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
((MASTER_PORT <= 65535)) || die "MASTER_PORT=$MASTER_PORT: expected a TCP port (1-65535)"

train_args=("$@")
if [[ -n "${RUN_DIR:-}" ]]; then
    for arg in "$@"; do
        case "$arg" in
            --run-dir | --run-dir=* | --save | --save=*)
                die "$arg: RUN_DIR=$RUN_DIR already sets the run directory and its checkpoints; drop the flag or unset RUN_DIR"
                ;;
        esac
    done
    train_args+=(--run-dir "$RUN_DIR")
    # Appended last so that, on a restart, resuming wins over an initial --load given by the user.
    if [[ -f "$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt" ]]; then
        train_args+=(--load "$RUN_DIR/checkpoints")
    fi
fi

# torchrun forwards SIGUSR1 too (Slurm's preemption signal, not among its defaults) and waits for the
# workers to save: they finish the step, checkpoint and exit with code 75.
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export PET_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-100}"

cmd=("$TORCHRUN"
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
    -m disco_megatron.train "${train_args[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf -v line '%q ' "${cmd[@]}"
    echo "${line% }"
else
    exec "${cmd[@]}"
fi
