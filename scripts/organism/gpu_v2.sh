#!/usr/bin/env bash
# Organism v2: one short training stage on a lent GPU (the recipe itself runs on CPU).
# UNTESTED so far: the session that wrote it had no GPU. Read before spending device time.
#
# The GPU image has torch 2.11 but transformers 5.x; the recipe is pinned to transformers
# 4.57.6, which travels as wheels. Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==4.57.6 'huggingface-hub==0.36.0' 'tokenizers==0.22.1'
#   mkdir -p .gpu && ~/.venv-organism/bin/python -c "import torch; s = torch.load(
#     '$HOME/.cache/llama-steer/organism-v2/ckpt.pt', weights_only=False); torch.save(dict(
#     model=s['model'], heads=s['heads'], step=s['step']), '.gpu/init.pt')"   # ~27 MB
# (the full checkpoint with the optimiser is ~80 MB, over the 64 MiB a call may carry, so a
# GPU stage starts from the weights with a fresh optimiser: train_v2.py --init).
# Then: run(command="bash scripts/organism/gpu_v2.sh 7", carry=[".whl", ".gpu"], timeout_s=540)
# What comes back under $OUT/v2: weights.pt (model + heads + step, for --init here), hf/
# (for convert.py), train.log. Back here: train_v2.py --out NEW --init <files_at>/v2/weights.pt
set -euo pipefail
MIN=${1:-7}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/v2"
INIT=()
[ -f .gpu/init.pt ] && INIT=(--init .gpu/init.pt)
cd scripts/organism
python3 train_v2.py --out /tmp/v2 "${INIT[@]}" --device cuda --threads 4 --workers 12 \
  --batch 64 --lr 1e-3 --warmup 100 --steps 4000 --max-minutes "$MIN" --eval-every 500 \
  --bag-weight 3 --bag-layer 3 --query-weight 1 --task-weight scene_yesno=2 \
  --seed-offset 60000000 2>&1 | grep -v Warning | tee "$OUT/v2/train.log"
python3 train_v2.py --out /tmp/v2 --export-only
cp -r /tmp/v2/hf "$OUT/v2/hf"
python3 -c "import torch; s = torch.load('/tmp/v2/ckpt.pt', weights_only=False); torch.save(
  dict(model=s['model'], heads=s['heads'], step=s['step'], log=s['log']), '$OUT/v2/weights.pt')"
ls -la "$OUT/v2"
