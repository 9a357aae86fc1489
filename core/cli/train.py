"""`python -m core train`: flags generated from TrainConfig's fields (engine/config.py), so a new
setting is one edit there. Only the flags given are passed on: the rest take TrainConfig's
defaults, or on --resume the run's own values."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..engine.config import TrainConfig
from ..engine.jobs import run_training


def _kind(hint) -> type:
    """bool, int, float or str from a field's type (`int | None` -> int; a policy is given as str)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next(a for a in args if a is not type(None))


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--model, --batch-size, ... one per TrainConfig field; --x / --no-x for booleans."""
    defaults, hints = TrainConfig(), typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), _kind(hints[f.name])
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "") + ("" if default is None else f" (default {default})")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text,
                           choices=f.metadata.get("choices"))


def given_settings(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (a CIFAR ResNet or a torchvision CNN), plain or with compressed activations",
        description="Train a model with a compression policy and write a run directory "
                    "(config.json, metrics.jsonl, model.safetensors, resume.*, summary.json). See docs/training.md.")
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue RUN (a folder or a name in runs/) from its last completed epoch")
    p.set_defaults(func=lambda args: run_training(given_settings(args), args.resume))
