#!/usr/bin/env bash
# Reproduce the canny ControlNet shipped beside ldm's default model (ldm/assets/default-canny, docs/control.md):
# the emoji dataset, then `ldm train stage=controlnet` on canny edges of its images with the model frozen, then
# the fp16 export. Resumable: run the same command again after an interruption.
#
#   scripts/train_default_canny.sh [OUT [KEY=VALUE ...]]     # default OUT: runs/default-canny
#
# Environment: DATA (dataset folder, default /work/data/emoji), SKIP_PREPARE=1 (use DATA as it is),
# EXPORT (where the fp16 folder goes; default OUT/default-canny; ldm/assets/default-canny to ship it).
# The shipped run used one CPU thread: OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/default-canny}
shift || true
DATA=${DATA:-/work/data/emoji}
EXPORT=${EXPORT:-$OUT/default-canny}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SKIP_PREPARE:-0}" != 1 ]; then
  python scripts/prepare_emoji.py --out "$DATA" --quiet
fi
if [ ! -f "$OUT/controlnet/config.json" ]; then
  python -m ldm.train --config configs/default.yaml --data "$DATA" --output "$OUT" --init default --resume \
    stage=controlnet "$@"
fi
python -c "
import sys, torch
from ldm.checkpoints.control import load_control, save_controlnet
save_controlnet(load_control(sys.argv[1]), sys.argv[2], torch.float16)
print('exported', sys.argv[2])" "$OUT/controlnet" "$EXPORT"
