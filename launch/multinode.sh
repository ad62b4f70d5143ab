#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher (pdsh by default), run from the first node.
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node1 launch/multinode.sh --config configs/my.yaml key=value ...
# The hostfile lists "hostname slots=GPUS" per node; every node needs this checkout and its .venv
# at the same path, and the shards reachable at the same paths or URLs.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
PY=${PYTHON:-.venv/bin/python}
DS=${DEEPSPEED:-$(dirname "$PY")/deepspeed}
config=configs/default.yaml
if [[ "${1:-}" == "--config" ]]; then config=$2; shift 2; fi
exec "$DS" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  ${LAUNCHER:+--launcher "$LAUNCHER"} --module navit_clip.cli train --config "$config" "$@"
