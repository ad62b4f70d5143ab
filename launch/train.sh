#!/usr/bin/env bash
# Train on one machine with the deepspeed launcher: one process per GPU (or NPROC processes on CPU).
#   launch/train.sh [--config configs/default.yaml] [key.sub=value ...]
#   NPROC=2 launch/train.sh train.out_dir=runs/two-ranks        # CPU: 2 gloo processes
# Relative paths (config, shards, out_dir) are taken from the directory you run it in.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DS=${DEEPSPEED:-$(dirname "$(command -v "$PY")")/deepspeed}
[[ -x "$DS" ]] || DS=$(command -v deepspeed) || { echo "deepspeed launcher not found; set DEEPSPEED" >&2; exit 2; }
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
else
  export DS_ACCELERATOR=cpu
  NPROC=${NPROC:-1}
fi
config=$ROOT/configs/default.yaml
if [[ "${1:-}" == "--config" ]]; then config=$2; shift 2; fi
exec "$DS" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module navit_clip.cli train --config "$config" "$@"
