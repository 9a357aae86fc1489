#!/usr/bin/env bash
# One time-boxed session on a single GPU: every run checkpoints/ lacks, trained in parallel, and
# beside them the main settings at 60 epochs; CUDA memory figures and the planner checked against
# max_memory_allocated while they train (the speed figures in the README come from an earlier
# session: timing on a busy card would mean nothing).
#
# Made for the device tool's limits: one command of at most 10 minutes, and at most 8 files of
# 16 MiB back from OUT_DIR. So everything is written under /tmp/session and packed into OUT_DIR
# as parts of one .tgz; a snapshot is packed every minute, so a command cut short still brings
# back every epoch that had finished (runs that did not finish keep their resume state).
#
# Before: mkdir -p .gpu && cp ../shared/data/cifar10-train-jpeg.zip .gpu/  (.gpu/ is git-ignored, so the
#         device call must name it in carry: [".gpu"])
# Usage:  scripts/gpu_session.sh CIFAR_ZIP OUT_DIR [BUDGET_S]      (BUDGET_S: the whole script, default 540)
# Unpack: cat OUT_DIR/session.tgz.part-* | tar xzf - -C SOMEWHERE   (then train_shipped.py --collect SOMEWHERE/runs)
# CPU rehearsal: DEVICE=cpu SMOKE_STEPS=3 JOBS=2 scripts/gpu_session.sh ZIP /tmp/out 240
# Needs only torch, torchvision, numpy, safetensors (no tqdm/streamlit/captum/plotly).
set -uo pipefail
ZIP=$1; OUT=$2; BUDGET=${3:-540}
DEVICE=${DEVICE:-cuda}; JOBS=${JOBS:-12}
SMOKE=(); [ -n "${SMOKE_STEPS:-}" ] && SMOKE=(--smoke-steps "$SMOKE_STEPS")
END=$(( $(date +%s) + BUDGET ))
S=/tmp/session; DATA=/tmp/cifar10-jpeg
rm -rf "$S"; mkdir -p "$OUT" "$S/runs" "$S/bench" "$DATA"
export PYTHONUNBUFFERED=1 POOLPROP_CACHE=/tmp/poolprop-cache

pack() {  # $S -> OUT/session.tgz.part-* (written beside, then renamed: a cut never leaves half a part)
  python - "$S" "$OUT" <<'EOF'
import io, json, os, sys, tarfile
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
def keep(info):
    p = src / info.name
    if p.name.startswith("resume.") and (p.parent / "summary.json").exists():
        try:
            if json.loads((p.parent / "summary.json").read_text()).get("status") == "finished":
                return None  # a finished run needs no resume state
        except ValueError:
            pass
    return None if p.name.endswith(".tmp") else info
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    tar.add(src, arcname=".", filter=keep)
data, part = buf.getvalue(), 15 * 2**20
names = [f"session.tgz.part-{i:02d}" for i in range((len(data) + part - 1) // part)]
for i, name in enumerate(names):
    (out / (name + ".tmp")).write_bytes(data[i * part:(i + 1) * part])
    os.replace(out / (name + ".tmp"), out / name)
for old in out.glob("session.tgz.part-*"):
    if old.name not in names:
        old.unlink()
print(f"packed {len(data) / 2**20:.1f} MiB in {len(names)} part(s)")
EOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"; } > "$S/gpu.txt" 2>&1
cat "$S/gpu.txt"
python -m zipfile -e "$ZIP" "$DATA/" || { echo "cannot unpack $ZIP (carry .gpu?)"; exit 2; }
# Decode the JPEGs once, before the runs start side by side (each would otherwise decode them too).
python -c "import sys; from core.engine.data import load_dataset; print('data', load_dataset(sys.argv[1]).train_x.shape)" \
  "imagefolder:$DATA/train" || exit 2

( while sleep 60; do pack > /dev/null; done ) &
SNAPSHOTS=$!
# The trainings stop at their deadline (SIGTERM, then up to 60 s to write the epoch's state),
# which leaves time for the last pack before the budget ends.
DEADLINE=$(( END - $(date +%s) - 90 ))
echo "training for at most ${DEADLINE}s on $DEVICE"
python scripts/train_shipped.py --cifar "$DATA/train" --out-root "$S/runs" --jobs "$JOBS" --missing-only \
  --device "$DEVICE" --num-threads 1 --deadline "$DEADLINE" "${SMOKE[@]}" > "$S/train_shipped.log" 2>&1 &
TRAIN=$!
python scripts/train_shipped.py --cifar "$DATA/train" --out-root "$S/runs" --jobs 3 --missing-only \
  --device "$DEVICE" --num-threads 1 --deadline "$DEADLINE" "${SMOKE[@]}" --epochs 60 \
  --only cifar-none-e60-s0 cifar-avg2+mask-e60-s0 cifar-avg4+mask-e60-s0 > "$S/train_long.log" 2>&1 &
LONG=$!

if [ "$DEVICE" = cuda ]; then
  for m in resnet18 resnet20; do
    python -m core bench memory --model $m --batch 128 --json > "$S/bench/memory_$m.json" 2> "$S/bench/memory_$m.err"
  done
  python - > "$S/bench/planner_cuda.json" 2> "$S/bench/planner_cuda.err" <<'EOF'
import json
from core import build_model, compress_model
from core.analysis import planner
out = []
for name in ("resnet20", "resnet18"):
    for policy in ("none", "avg2+mask", "avg2+mask+bn8"):
        plan = planner.plan_memory(name, policy, device="cuda")
        model = compress_model(build_model(name), policy).cuda()
        measured = planner.training_peak(model, 512, 32, 10, device="cuda")
        out.append({"model": name, "policy": policy, "batch": 512, "predicted": plan.predict(512),
                    "measured": measured})
print(json.dumps(out, indent=1))
EOF
fi

wait $TRAIN $LONG
kill $SNAPSHOTS 2> /dev/null; wait $SNAPSHOTS 2> /dev/null  # a snapshot under way ends first
tail -n 20 "$S/train_shipped.log" "$S/train_long.log"
pack
ls -la "$OUT"
