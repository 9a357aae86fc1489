"""`python -m core evaluate --run RUN [--dataset NAME]`: accuracy and loss of a run's weights."""

from __future__ import annotations

import json

from ..engine.evaluate import SPLITS, TTA, evaluate_run


def cmd_evaluate(args) -> int:
    res = evaluate_run(args.run, dataset=args.dataset, split=args.split, data_dir=args.data_dir,
                       device=args.device, batch_size=args.batch_size, subset=args.subset, tta=args.tta)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} ({res['policy']}) on {res['dataset']} {res['split']}"
          f"{' with flip test-time augmentation' if res['tta'] == 'flip' else ''}: "
          f"accuracy {100 * res['acc']:.2f}% ({res['correct']}/{res['n']}), loss {res['loss']:.4f}")
    width = max(len(str(c)) for c in res["classes"])
    for c, a in zip(res["classes"], res["per_class_acc"]):
        print(f"  {str(c).ljust(width)}  {'-' if a is None else f'{100 * a:.1f}%'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="accuracy and loss of a run's weights",
                              description="Evaluate a run's model.safetensors (exact forward, policy irrelevant).")
    p.add_argument("--run", required=True, help="run folder, or a run name in runs/ or checkpoints/")
    p.add_argument("--dataset", default=None, help="features10 | cifar10 | imagefolder:PATH (default: the run's)")
    p.add_argument("--split", choices=SPLITS, default="val")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--subset", type=int, default=None, help="evaluate on a fixed subset of N images")
    p.add_argument("--tta", choices=TTA, default="none",
                   help="test-time augmentation: flip averages each prediction with the mirror image's "
                        "(for classes that mirroring does not change, as CIFAR-10's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_evaluate)
