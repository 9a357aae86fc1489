#!/usr/bin/env bash
# The GPU figures issues 26 and 27 ask for, on an idle card (run it before any training: timing on
# a busy card means nothing). Writes JSON into OUT_DIR; every command is bounded by BUDGET_S.
#   passes:  each Triton kernel against its PyTorch reference on ResNet-18's first-stage activation
#            (batch BATCH18, 64 channels, SIZE/4 px): the same bits on the card, time, peak memory
#   inplace_bn: the low-precision BatchNorm written over its input gives the same bits on the card
#   inplace_block: a block whose conv and backwards write over what is theirs alone, against the
#            same block with nothing vouched: forward bits, gradients' largest relative difference;
#            and a downsampling block's compact shortcut gradient against the plain calls
#   speed:   ResNet-18 (ImageNet stem, 224 px, batch 256) and torchvision's ResNet-50 (224 px,
#            batch 64): wall ratio (CUDA events) and max_memory_allocated per policy, with the
#            Triton kernels on and with the PyTorch reference (--reference)
#   planner: predicted peaks (fits at batches 64-128 on the card) against a real step's
#            max_memory_allocated at a larger batch, for two torchvision models
#   then, if time is left: ResNet-18's peaks with the optimiser step inside the backward, and
#            what that step costs against a plain one
# Usage:  scripts/gpu_bench.sh OUT_DIR [BUDGET_S]             (device call: timeout_s >= BUDGET_S + 60)
# CPU rehearsal: PATH=.venv/bin:$PATH DEVICE=cpu SIZE=64 BATCH18=8 BATCH50=4 PLAN_BATCH=8 FIT="2 4" scripts/gpu_bench.sh /tmp/gb 500
# Needs only torch, torchvision, numpy, safetensors.
set -uo pipefail
OUT=$1; BUDGET=${2:-480}
DEVICE=${DEVICE:-cuda}; SIZE=${SIZE:-224}; BATCH18=${BATCH18:-256}; BATCH50=${BATCH50:-64}
PLAN_BATCH=${PLAN_BATCH:-256}; FIT=${FIT:-64 96 128}
POLICIES="none avg2+mask avg2+mask+bn8 q4+mask+bn4 q2+mask+bn2 ckpt"
mkdir -p "$OUT"
END=$(( $(date +%s) + BUDGET ))
left() { echo $(( END - $(date +%s) )); }
run() {  # name, then the command: bounded by the time left, output to OUT/name.json
  local name=$1; shift
  [ "$(left)" -gt 20 ] || { echo "skip $name: out of time"; return; }
  timeout "$(left)" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; echo "$name rc=$?"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1
run passes python -m core bench passes --batch "$BATCH18" --channels 64 --size $(( SIZE / 4 )) --repeats 20 \
    --device "$DEVICE" --json
run inplace_bn python - "$DEVICE" <<'PY'
# the low-precision BatchNorm writing over its input (native_batch_norm.out aliased): the same
# output and running statistics as out of place, on the card, in both layouts
import copy, json, sys, torch
from torch import nn
from core import compress_model
from core.method.layout import vouched_forward
device, out = sys.argv[1], []
for store in ("bn8", "bn4"):
    for cl in (False, True):
        torch.manual_seed(0)
        fmt = torch.channels_last if cl else torch.contiguous_format
        plain = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)).to(device, memory_format=fmt)
        x = torch.randn(32, 64, 56, 56, device=device).contiguous(memory_format=fmt)
        runs = []
        for inplace in (True, False):
            model = compress_model(copy.deepcopy(plain), store)
            model[1].pp_inplace = inplace
            with vouched_forward():  # as inside a declaring model's forward
                y = model(x)
            runs.append((y.detach(), model[1].running_mean, model[1].running_var))
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        out.append({"store": store, "channels_last": cl, "same_bits": same})
        print(store, cl, same, file=sys.stderr)
print(json.dumps(out, indent=1))
PY
run inplace_block python - "$DEVICE" <<'PY'
# a compressed block whose second conv writes over its input (batch chunks) and whose backwards
# write over their own gradients, against the same block with nothing vouched: the forward's
# bits (cuDNN may pick another algorithm for a chunk) and how far the gradients are apart
import json, sys, torch
from core import compress_model
from core.method import shortcut
from core.models.resnet import BasicBlock
device, out = sys.argv[1], []
find_shortcut = shortcut._strided_shortcut_conv
for policy in ("avg2+mask+bn8", "q4+mask+bn4"):
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.randn(32, 64, 56, 56, device=device).contiguous(memory_format=fmt)
        runs = []
        for vouched in (True, False):
            torch.manual_seed(0)
            block = compress_model(BasicBlock(64, 64), policy).to(device, memory_format=fmt)
            if not vouched:
                for m in block.modules():
                    if hasattr(m, "pp_input_from"):
                        m.pp_input_from, m.pp_inplace = (), False
            torch.manual_seed(1)
            y = block(x.requires_grad_())
            grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
            runs.append((y.detach(), grads))
        (y1, g1), (y2, g2) = runs
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(g1, g2))
        out.append({"policy": policy, "channels_last": cl, "forward_same_bits": torch.equal(y1, y2),
                    "grad_max_rel_diff": diff})
        print(out[-1], file=sys.stderr)
        # a downsampling block whose 1x1 shortcut hands back a compact input gradient (computed 8
        # samples at a time), against the plain calls (nothing else changed: a hook on the
        # shortcut conv would also keep its BatchNorm from writing over its input, bn8's rounding)
        x = torch.randn(32, 64, 56, 56, device=device).contiguous(memory_format=fmt)
        runs = []
        for fanned in (True, False):
            torch.manual_seed(0)
            block = compress_model(BasicBlock(64, 128, stride=2), policy).to(device, memory_format=fmt)
            shortcut._strided_shortcut_conv = find_shortcut if fanned else (lambda downsample: None)
            torch.manual_seed(1)
            y = block(x.requires_grad_())
            runs.append(torch.autograd.grad(y.square().sum(), [x, *block.parameters()]))
        shortcut._strided_shortcut_conv = find_shortcut
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*runs))
        out.append({"policy": policy, "channels_last": cl, "block": "downsampling, compact shortcut gradient",
                    "grads_same_bits": all(torch.equal(a, b) for a, b in zip(*runs)), "grad_max_rel_diff": diff})
        print(out[-1], file=sys.stderr)
print(json.dumps(out, indent=1))
PY
for ref in "" "--reference"; do
  tag=${ref:+_reference}
  run "speed_resnet18$tag" python -m core bench speed --model resnet18 --stem imagenet --size "$SIZE" \
      --batch "$BATCH18" --repeats 7 --device "$DEVICE" --json --policies $POLICIES $ref
  run "speed_resnet50$tag" python -m core bench speed --model torchvision:resnet50 --size "$SIZE" \
      --batch "$BATCH50" --repeats 7 --device "$DEVICE" --json --policies $POLICIES $ref
done
run planner python - "$DEVICE" "$SIZE" "$PLAN_BATCH" $FIT <<'PY'
import json, sys
from core import build_model, compress_model
from core.analysis import planner
device, size, batch, fit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(b) for b in sys.argv[4:]]
out = []
for name in ("torchvision:resnet50", "torchvision:efficientnet_b0"):
    for policy in ("none", "avg2+mask+bn8", "q4+mask+bn4"):
        kw = {"cuda_fit_batches": fit} if device == "cuda" else {"fit_batches": fit}
        plan = planner.plan_memory(name, policy, size=size, device=device, num_classes=1000, **kw)
        model = compress_model(build_model(name, num_classes=1000), policy).to(device)
        measured = planner.training_peak(model, batch, size, 1000, device=device)
        # CUDA: max_memory_allocated is absolute; the CPU's step peak counts what the step allocates
        state = plan.model_state
        predicted = plan.predict(batch) - (0 if device == "cuda" else state["params"] + state["optimizer"])
        out.append({"model": name, "policy": policy, "batch": batch, "predicted": predicted, "measured": measured,
                    "error": predicted / measured - 1, "measure": plan.measure})
        print(name, policy, f"{predicted / measured - 1:+.1%}", file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
PY
run memory_resnet18_step_in_backward python -m core bench memory --model resnet18 --stem imagenet --size "$SIZE" \
    --batch "$BATCH18" --device "$DEVICE" --json --policies $POLICIES --step-in-backward
run speed_resnet18_step_in_backward python -m core bench speed --model resnet18 --stem imagenet --size "$SIZE" \
    --batch "$BATCH18" --repeats 5 --no-peak --device "$DEVICE" --json --policies none avg2+mask+bn8 --step-in-backward
ls -la "$OUT"
