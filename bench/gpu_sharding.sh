#!/usr/bin/env bash
# The FSDP2 GPU check, one call (under 8 minutes): world size 1 and every lent GPU through the Trainer's own fsdp
# switch (accelerate shards on GPUs), and 1 vs 2 where more than 2 GPUs exist. Needs a venv with CUDA torch
# and the pinned stack (scripts/env.sh); prints the table docs/benchmarks.md records.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo "no GPU visible" >&2; exit 2; fi
python - <<'PY'
import torch
print(torch.__version__, torch.cuda.get_device_name(0))
PY
PYTHONPATH=. python bench/sharding.py --device cuda --worlds 1 "$gpus" --steps 12 --global-batch 8 --out "${OUT:-/tmp}/sharding-gpu"
if [ "$gpus" -gt 2 ]; then
  PYTHONPATH=. python bench/sharding.py --device cuda --worlds 1 2 --steps 12 --global-batch 8 --out "${OUT:-/tmp}/sharding-gpu2"
fi
