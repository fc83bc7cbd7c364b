#!/usr/bin/env bash
# Pretrain with torchrun on one node or many. Every argument goes to `python -m megalite.train`.
#
#   launch/pretrain.sh                         # no arguments: the demo (tools/demo.py)
#   launch/pretrain.sh --config run.yaml       # one node: one process per GPU (one on a CPU)
#   NPROC=4 launch/pretrain.sh --tensor-model-parallel-size 2 ...   # 4 processes (also on CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/pretrain.sh ...  # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/pretrain.sh ...  # on node1
#
# Preemption: on SIGTERM the trainer finishes its iteration, saves (with --save) and exits 0.
# On a large model that save takes minutes, and torchrun kills its workers 30 s after it
# forwards a signal. MEGALITE_SHUTDOWN_TIMEOUT (seconds, default 600) is how long they get:
#   - a SIGTERM to this script (kill PID, a container stopping its PID 1) goes to the workers
#     themselves, not through torchrun, so torchrun returns the workers' own status: 0 after a
#     clean save. Workers still running MEGALITE_SHUTDOWN_TIMEOUT seconds later are killed.
#   - a SIGTERM that also reaches torchrun (SLURM signals every process of the job step; so
#     does `kill -TERM -- -PGID`): torchrun runs with --shutdown-timeout
#     MEGALITE_SHUTDOWN_TIMEOUT, so it waits that long for the workers before SIGKILL. Having
#     been signalled, torchrun then exits 1 even when every worker saved and exited 0.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# glibc maps every buffer above 32 MB afresh and unmaps it on free, so each training step
# page-faults its large activations and logits in again: on the 2-core CPU test machine the
# train-step benchmark ran 18-20% faster (both megalite and plain PyTorch) with freed memory kept
# for reuse, which is what this setting does (as jemalloc/tcmalloc setups do for CPU training).
# A GLIBC_TUNABLES you set yourself is left alone; MEGALITE_SYSTEM_MALLOC=1 keeps glibc's defaults.
if [ -z "${GLIBC_TUNABLES:-}" ] && [ -z "${MEGALITE_SYSTEM_MALLOC:-}" ]; then
  export GLIBC_TUNABLES="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
fi

if [ "$#" -eq 0 ]; then
  exec "$PYTHON" "$here/tools/demo.py"
fi

SHUTDOWN_TIMEOUT="${MEGALITE_SHUTDOWN_TIMEOUT:-600}"
if ! [[ "$SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]]; then
  echo "error: MEGALITE_SHUTDOWN_TIMEOUT must be a whole number of seconds, not '$SHUTDOWN_TIMEOUT'" >&2
  exit 1
fi

if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES="${NNODES:-1}"

if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  # One node: torchrun picks a free port itself, so two runs on one machine do not collide.
  rdzv=(--standalone)
else
  : "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0) for a multi-node run}"
  rdzv=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
        --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi

# On a CPU each process gets its share of the cores rather than torchrun's default of 1.
if [ -z "${OMP_NUM_THREADS:-}" ] && ! "$PYTHON" -c 'import torch,sys; sys.exit(not torch.cuda.is_available())'; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi

cd "$here"
# torchrun runs as a child (not exec'd) so that this script can catch SIGTERM (header).
"$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" \
  --shutdown-timeout "$SHUTDOWN_TIMEOUT" -m megalite.train "$@" &
torchrun=$!
sigterm_at=""
forward_sigterm() {
  sigterm_at="${sigterm_at:-$SECONDS}"
  # torchrun's children are the workers (before it has started them: torchrun itself).
  pkill -TERM -P "$torchrun" 2>/dev/null || kill -TERM "$torchrun" 2>/dev/null || true
}
trap forward_sigterm TERM
# Ctrl-C reaches torchrun too (it is in this script's process group), and torchrun stops the
# workers: keep waiting for it, so the shell prompt comes back once they are gone.
trap '' INT

set +e
while :; do
  wait "$torchrun"
  status=$?
  kill -0 "$torchrun" 2>/dev/null || break # torchrun exited: $status is its own
  # `wait` returned to run the trap: the workers are saving; give them SHUTDOWN_TIMEOUT.
  while kill -0 "$torchrun" 2>/dev/null && ((SECONDS - sigterm_at < SHUTDOWN_TIMEOUT)); do
    sleep 1
  done
  if kill -0 "$torchrun" 2>/dev/null; then
    echo "launch/pretrain.sh: workers still running ${SHUTDOWN_TIMEOUT}s after SIGTERM" \
      "(MEGALITE_SHUTDOWN_TIMEOUT); killing them" >&2
    pkill -KILL -P "$torchrun"
  fi
done
exit "$status"
