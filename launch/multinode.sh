#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher (pdsh by default), run from the first node.
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node1 launch/multinode.sh --config configs/my.yaml key=value ...
# The hostfile lists "hostname slots=GPUS" per node. Every node needs this checkout and its .venv
# at the same path, the shards at the same paths or URLs, and train.out_dir on storage that all
# nodes share: checkpoints are written by every rank and read back by every rank on resume.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
PY=${PYTHON:-$ROOT/.venv/bin/python}
DS=${DEEPSPEED:-$(dirname "$(command -v "$PY")")/deepspeed}
[[ -x "$DS" ]] || DS=$(command -v deepspeed) || { echo "deepspeed launcher not found; set DEEPSPEED" >&2; exit 2; }
config=$ROOT/configs/default.yaml
if [[ "${1:-}" == "--config" ]]; then config=$2; shift 2; fi
exec "$DS" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  ${LAUNCHER:+--launcher "$LAUNCHER"} --module navit_clip.cli train --config "$config" "$@"
