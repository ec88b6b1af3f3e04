#!/usr/bin/env bash
# Export the shipped-weights file $1 (default: export/data/tiny_trained.npz) as an F32 bundle and a default
# bundle under $2, then evaluate both on N images per task (development check of a training run).
set -euo pipefail
npz=${1:-export/data/tiny_trained.npz}; out=${2:-/tmp/ttcheck}; n=${N:-20}
rm -rf "$out"; mkdir -p "$out"
export XDG_CACHE_HOME="$out/xdg"
python -c "
from pathlib import Path; from qwenvl_edge.export.tiny_trained import write_tiny_trained
write_tiny_trained(Path('$out/ckpt'), path=Path('$npz'))"
qwenvl-edge export -q --vision fp32 --llm F32 "$out/ckpt" "$out/f32"
qwenvl-edge export -q "$out/ckpt" "$out/q"
qwenvl-edge eval "$out/q" --reference "$out/f32" --n "$n" --seed 2 --threads 2
