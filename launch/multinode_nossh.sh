#!/usr/bin/env bash
# Train on several nodes without ssh between them: run this once on EVERY node, each with its own
# NODE_RANK (0 on the node at MASTER_ADDR). Each invocation starts only its own node's ranks.
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode_nossh.sh --config configs/my.yaml key=value ...
# The hostfile (same file on every node) fixes the node order and slots; its hostnames are only
# labels here. Same requirements as multinode.sh: same checkout, venv and shard paths on every
# node, and train.out_dir on storage that all nodes share.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (see launch/hostfile.example)}"
: "${NODE_RANK:?set NODE_RANK to the line number of this node in the hostfile, from 0}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, reachable from every node}"
PY=${PYTHON:-$ROOT/.venv/bin/python}
DS=${DEEPSPEED:-$(dirname "$(command -v "$PY")")/deepspeed}
[[ -x "$DS" ]] || DS=$(command -v deepspeed) || { echo "deepspeed launcher not found; set DEEPSPEED" >&2; exit 2; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu  # gloo
fi
config=$ROOT/configs/default.yaml
if [[ "${1:-}" == "--config" ]]; then config=$2; shift 2; fi
exec "$DS" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module navit_clip.cli train --config "$config" "$@"
