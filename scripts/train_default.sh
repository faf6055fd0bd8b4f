#!/usr/bin/env bash
# Reproduce ldm's shipped default model end to end: the emoji dataset, the VAE, then text encoder + U-Net.
# Resumable: run the same command again after an interruption and every step continues from its newest
# checkpoint (a finished stage is not redone).
#
#   scripts/train_default.sh [OUT]            # default OUT: runs/default; DATA overrides the dataset folder
#
# Results: OUT/vae/model/vae (the VAE), OUT/unet/model (the full model, loads with Pipeline.from_pretrained).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/default}
DATA=${DATA:-/work/data/emoji}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python scripts/prepare_emoji.py --out "$DATA" --quiet
if [ ! -f "$OUT/vae/model/vae/config.json" ]; then
  python -m ldm.train --config configs/default.yaml --data "$DATA" --output "$OUT/vae" --resume stage=vae
fi
if [ ! -f "$OUT/unet/model/model_index.json" ]; then
  python -m ldm.train --config configs/default.yaml --data "$DATA" --output "$OUT/unet" --resume stage=unet \
    vae_from="$OUT/vae/model"
fi
echo "default model: $OUT/unet/model"
