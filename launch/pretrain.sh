#!/usr/bin/env bash
# Pretrain with torchrun on one node or many. Every argument goes to `python -m megalite.train`.
#
#   launch/pretrain.sh                         # no arguments: the demo (tools/demo.py)
#   launch/pretrain.sh --config run.yaml       # one node: one process per GPU (one on a CPU)
#   NPROC=4 launch/pretrain.sh --tensor-model-parallel-size 2 ...   # 4 processes (also on CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/pretrain.sh ...  # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/pretrain.sh ...  # on node1
#   MAX_RESTARTS=3 launch/pretrain.sh --save ck --load ck ...   # a crashed worker restarts all
#
# Network interface (NNODES > 1, or MASTER_ADDR set). On a CPU (gloo) run with
# GLOO_SOCKET_IFNAME unset, the script sets it to the interface this node reaches MASTER_ADDR
# through (`ip route get`; on node 0, the interface that holds MASTER_ADDR) and prints that
# choice on one line: gloo's own default follows the hostname, which on many machines
# resolves to a loopback or management address that the other nodes cannot reach. Without
# `ip`, or without a route, it says so and lets torch choose.
#   GLOO_SOCKET_IFNAME=ib0         your choice for gloo, kept as it is
#   NCCL_SOCKET_IFNAME=ib0         your choice for NCCL's bootstrap (never set by this script)
#   MEGALITE_SOCKET_IFNAME=ib0     both of the above at once (each one you set yourself wins)
#
# Restarts: MAX_RESTARTS=N (default 0) is torchrun's --max-restarts. When a worker dies,
# torchrun stops every worker of the job (the other nodes' agents restart theirs too) and
# starts them again with the same command line, up to N times: with --save = --load they
# resume from the last checkpoint. Two things differ from a run without restarts, both because
# torch's agents keep one key-value store across restarts, where a restarted group would read
# the dead group's addresses (its connections are refused; pytorch/pytorch#135712):
#   - TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each attempt's workers open a store of their own.
#   - several nodes rendezvous through torchrun's c10d backend (at MASTER_ADDR:MASTER_PORT,
#     hosted by node 0's torchrun) rather than the static one, which has no such option. Node
#     ranks are then assigned by the rendezvous (in order of address), not taken from
#     NODE_RANK, which only says which node hosts it; each node gives its address on the
#     interface to MASTER_ADDR (--local-addr).
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

MAX_RESTARTS="${MAX_RESTARTS:-0}"
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "error: MAX_RESTARTS must be a whole number (torchrun's --max-restarts), not '$MAX_RESTARTS'" >&2
  exit 1
fi

if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES="${NNODES:-1}"

has_cuda() { # asks torch once
  if [ -z "${cuda:-}" ]; then
    cuda=0
    "$PYTHON" -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' && cuda=1
  fi
  [ "$cuda" = 1 ]
}

# Sets master_dev and master_src: the interface and the source address this node reaches
# MASTER_ADDR with; both empty when `ip` is missing or there is no route.
route_to_master() {
  master_dev="" master_src=""
  command -v ip >/dev/null || return 0
  local addr route
  addr=$("$PYTHON" -c 'import socket,sys; print(socket.getaddrinfo(sys.argv[1], None)[0][4][0])' \
    "$MASTER_ADDR" 2>/dev/null) || return 0
  route=$(ip -o route get "$addr" 2>/dev/null) || return 0
  read -r master_dev master_src < <(awk '{ for (i = 1; i < NF; i++) {
      if ($i == "dev") d = $(i + 1); if ($i == "src") s = $(i + 1) } } END { print d, s }' \
    <<<"$route")
  if [ "$master_dev" = lo ]; then # MASTER_ADDR is this node: the interface that holds it
    master_dev=$(ip -o addr show to "$addr" 2>/dev/null | awk '{ print $2; exit }')
  fi
}

if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  # One node: torchrun picks a free port itself, so two runs on one machine do not collide.
  rdzv=(--standalone)
else
  : "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0) for a multi-node run}"
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
  MASTER_PORT="${MASTER_PORT:-29500}"
  if [ -n "${MEGALITE_SOCKET_IFNAME:-}" ]; then
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$MEGALITE_SOCKET_IFNAME}"
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$MEGALITE_SOCKET_IFNAME}"
  fi
  route_to_master
  if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && ! has_cuda; then
    if [ -n "$master_dev" ]; then
      export GLOO_SOCKET_IFNAME="$master_dev"
      echo "launch/pretrain.sh: GLOO_SOCKET_IFNAME=$master_dev (this node's interface to" \
        "MASTER_ADDR $MASTER_ADDR)"
    else
      echo "launch/pretrain.sh: no interface found to MASTER_ADDR $MASTER_ADDR (it does not" \
        "resolve, no 'ip', or no route); torch picks one (set GLOO_SOCKET_IFNAME to choose)" >&2
    fi
  fi
  if [ "$MAX_RESTARTS" -gt 0 ]; then # the c10d rendezvous: header, "Restarts"
    rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv-id megalite --rdzv-conf "is_host=$((NODE_RANK == 0 ? 1 : 0))")
    [ -z "$master_src" ] || rdzv+=(--local-addr "$master_src")
  else
    rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  fi
fi
if [ "$MAX_RESTARTS" -gt 0 ]; then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 # a fresh store per attempt (header, "Restarts")
fi

# On a CPU each process gets its share of the cores rather than torchrun's default of 1.
if [ -z "${OMP_NUM_THREADS:-}" ] && ! has_cuda; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi

cd "$here"
# torchrun runs as a child (not exec'd) so that this script can catch SIGTERM (header).
"$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" \
  --max-restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" -m megalite.train "$@" &
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
