"""Which of torchvision's classification models compress_model converts as they come:

    python scripts/torchvision_scan.py                       # every builder, q4+mask+bn4
    python scripts/torchvision_scan.py --policy avg2+mask+bn8 --run 299   # Inception-v3's aux head needs 299

Each model is built with random weights (nothing is downloaded) and converted; with --run SIZE
a batch of 2 images of that size also runs one training step through it (pooling policies can
refuse a layer whose input is too small for K, naming it). One line per model, then a count.
The README's claim about torchvision's builders comes from this script.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import PolicyError, compress_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="q4+mask+bn4")
    parser.add_argument("--run", type=int, default=0, metavar="SIZE", help="also one training step at SIZE px")
    args = parser.parse_args()
    converted = 0
    names = torchvision.models.list_models(module=torchvision.models)
    for name in names:
        model = torchvision.models.get_model(name, num_classes=10)
        try:
            compress_model(model, args.policy)
            if args.run:
                out = model(torch.randn(2, 3, args.run, args.run))
                out = out[0] if isinstance(out, tuple) else out  # GoogLeNet's, Inception's aux logits
                F.cross_entropy(out, torch.zeros(2, dtype=torch.long)).backward()
            converted += 1
            print(f"{name:24s} converted" + (f", a step at {args.run} px" if args.run else ""), flush=True)
        except PolicyError as e:
            print(f"{name:24s} REFUSED: {str(e)[:240]}", flush=True)
        except RuntimeError as e:  # the plain model cannot run at this size either (Inception-v3's aux head at 224 px)
            print(f"{name:24s} FAILED at {args.run} px: {str(e).splitlines()[0][:200]}", flush=True)
        del model
        gc.collect()
    print(f"{converted} of {len(names)} converted under {args.policy}")
    return 0 if converted == len(names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
