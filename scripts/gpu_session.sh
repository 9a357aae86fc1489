#!/usr/bin/env bash
# One time-boxed session on a single GPU: speed and memory benchmarks, the memory planner
# checked against max_memory_allocated, then the whole shipped set trained in parallel, and
# beside it the main settings at 60 and 90 epochs.
# Usage: scripts/gpu_session.sh CIFAR_ZIP OUT_DIR [DEADLINE_S]
# Needs only torch, torchvision, numpy, safetensors (no tqdm/streamlit/captum/plotly).
set -uo pipefail
ZIP=$1; OUT=$2; DEADLINE=${3:-420}
export PYTHONUNBUFFERED=1 POOLPROP_CACHE=/tmp/poolprop-cache
mkdir -p "$OUT" /tmp/cifar
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
python -m zipfile -e "$ZIP" /tmp/cifar/

# Speed first, on a quiet card.
python -m core bench speed --model resnet20 --batch 128 --repeats 15 --json > "$OUT/speed_resnet20.json"
python -m core bench speed --model resnet18 --batch 128 --repeats 7 --json > "$OUT/speed_resnet18.json"

# Trainings in the background; memory figures (per-process peaks) beside them.
python scripts/train_shipped.py --cifar /tmp/cifar/train --out-root /tmp/shipped --jobs 15 --missing-only \
  --device cuda --deadline "$DEADLINE" > "$OUT/train_shipped.log" 2>&1 &
TRAIN=$!
# Beside it, the longer recipe the >= 88 % baseline may need (README): 60 and 90 epochs.
python scripts/train_shipped.py --cifar /tmp/cifar/train --out-root /tmp/shipped --jobs 6 --missing-only \
  --device cuda --deadline "$DEADLINE" --epochs 60 --long-epochs 90 \
  --only cifar-none-e60-s0 cifar-avg2+mask-e60-s0 cifar-avg4+mask-e60-s0 \
         cifar-none-e90-s0 cifar-avg2+mask-e90-s0 cifar-avg4+mask-e90-s0 > "$OUT/train_long.log" 2>&1 &
LONG=$!
python -m core bench memory --model resnet18 --batch 128 --json > "$OUT/memory_resnet18.json"
python -m core bench memory --model resnet20 --batch 128 --json > "$OUT/memory_resnet20.json"
python - > "$OUT/planner_cuda.json" <<'EOF' || true
import json
from core import memory
from core.compression import compress_model
from core.models import build_model
out = []
for name in ("resnet20", "resnet18"):
    for policy in ("none", "avg2+mask", "avg2+mask+bn8"):
        plan = memory.plan_memory(name, policy, device="cuda")
        model = compress_model(build_model(name), policy).cuda()
        measured = memory.cuda_training_peak(model, 512, 32, 10, device="cuda")
        out.append({"model": name, "policy": policy, "batch": 512, "predicted": plan.predict(512),
                    "measured": measured})
print(json.dumps(out, indent=1))
EOF
wait $TRAIN $LONG
tail -25 "$OUT/train_shipped.log" "$OUT/train_long.log"
for f in /tmp/shipped/*.log; do echo "== $f"; tail -n 5 "$f"; done
# Bring the runs back without their resume state, in parts under the 16 MiB file limit.
(cd /tmp/shipped && tar czf - --exclude='resume.*' */ *.log) | split -b 15m - "$OUT/shipped.tgz.part-"
ls -la "$OUT"
