"""`TrainConfig`: everything that defines a run, validated once, carried as JSON.

The config travels as `to_dict()` JSON from the app to the job runner and into config.json;
`python -m core train` generates its flags from these fields (core/cli/train.py), so a new
setting is one edit here: the field, its default and its `help` metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..method import CompressionPolicy
from ..models import STEMS, is_model_name, model_names_help
from .step_in_backward import refusal as step_in_backward_refusal

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine")
AMP_DTYPES = ("auto", "bf16", "fp16")
BASE_LR = {"sgd": 0.1, "adamw": 2e-3}  # at batch 128; scaled linearly with the batch size
BASE_WD = {"sgd": 5e-4, "adamw": 0.05}
BASE_WARMUP = {"onecycle": 0.25, "cosine": 0.05}  # fraction of all steps
# Settings that may differ on `--resume` without changing what is trained.
RESUME_MAY_CHANGE = {"epochs", "device", "num_threads", "log_every", "progress", "data_dir", "eval_every",
                     "fidelity_every", "step_in_backward"}


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything that defines a run. `None` means "the sensible default" (see `resolved`)."""

    model: str = _f("resnet20", model_names_help())
    dataset: str = _f("features10", "features10 | cifar10 | imagefolder:PATH")
    policy: str | CompressionPolicy = _f("none", "compression policy, e.g. none, avg2+mask, q4+mask+bn4, "
                                                 "avg4-lowres+mask+bn8")
    epochs: int = _f(10, "passes over the training images")
    steps: int | None = _f(None, "cap on total optimiser steps (smoke runs)")
    batch_size: int = _f(128, "images per step")
    optimizer: str = _f("sgd", "sgd (Nesterov, momentum 0.9) or adamw", choices=OPTIMIZERS)
    lr: float | None = _f(None, "peak LR (default 0.1 SGD / 2e-3 AdamW, x batch/128)")
    schedule: str = _f("onecycle", "per-step LR schedule: one-cycle, or linear warmup + cosine", choices=SCHEDULES)
    warmup: float | None = _f(None, "warmup fraction of all steps (0.25 onecycle, 0.05 cosine)")
    weight_decay: float | None = _f(None, "on conv/linear weights only (5e-4 SGD, 0.05 AdamW)")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy")
    seed: int = _f(0, "seed of initialisation, batch order and augmentation")
    device: str = _f("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    amp: bool | None = _f(None, "mixed precision (default: on for CUDA only)")
    amp_dtype: str = _f("auto", "bf16 where supported, else fp16 (+ GradScaler)", choices=AMP_DTYPES)
    channels_last: bool = _f(True, "channels_last memory format")
    step_in_backward: bool = _f(False, "optimiser step inside the backward: each parameter updated as soon as its "
                                       "gradient is complete, so the gradients never all coexist (less memory, same "
                                       "update; not with fp16 loss scaling or several GPUs)")
    out: str | None = _f(None, "run directory (default runs/<model>-<data>-<policy>-s<seed>-<time>)")
    data_dir: str | None = _f(None, "where datasets are cached/downloaded")
    log_every: int = _f(20, "steps between step records")
    eval_every: int = _f(1, "epochs between evaluations (the last epoch is always evaluated)")
    fidelity_every: int = _f(100, "steps between gradient-fidelity records; 0 = never")
    deterministic: bool = _f(False, "deterministic algorithms, one thread: bitwise reproducible on the CPU")
    num_threads: int | None = _f(None, "CPU threads (default: torch's)")
    train_subset: int | None = _f(None, "train on a fixed subset of N images (smoke runs, demos)")
    val_subset: int | None = _f(None, "evaluate on a fixed subset of N images")
    time_budget: float | None = _f(None, "seconds of training; the LR schedule then completes within it")
    stem: str = _f("cifar", "ResNet-18/34/50 stem (PoolProp's ResNets; torchvision's keep their own)",
                   choices=STEMS)
    weights: str | None = _f(None, "initial weights: a local safetensors state_dict (never downloaded)")
    augment: bool = _f(True, "random crop + flip")
    split_seed: int = _f(0, "seed of the train/val split and subsets")
    eval_batch_size: int = _f(512, "images per evaluation batch")
    progress: bool = _f(True, "progress bar / lines on stderr")

    # -- defaults ----------------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """A copy with every `None` default filled in, the choices validated, and the policy
        parsed (a CompressionPolicy from here on: parsed once, never again as text)."""
        c = dataclasses.replace(self, policy=CompressionPolicy.parse(self.policy))
        c._check_settings()
        if c.lr is None:
            c.lr = round(BASE_LR[c.optimizer] * c.batch_size / 128, 8)
        if c.weight_decay is None:
            c.weight_decay = BASE_WD[c.optimizer]
        if c.warmup is None:
            c.warmup = BASE_WARMUP[c.schedule]
        return c

    def validate(self) -> None:
        """Raise ValueError (PolicyError is one) naming the first setting that cannot train."""
        CompressionPolicy.parse(self.policy)
        self._check_settings()

    def _check_settings(self) -> None:
        if not is_model_name(self.model):
            raise ValueError(f"unknown model {self.model!r}; choose {model_names_help()}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"unknown {f.name.replace('_', ' ')} {getattr(self, f.name)!r}; "
                                 f"choose one of {', '.join(choices)}")
        for name in ("epochs", "batch_size", "log_every", "eval_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("steps", "train_subset", "val_subset"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.fidelity_every < 0:
            raise ValueError("fidelity_every must be 0 (off) or positive")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError("time_budget must be positive (seconds)")
        if self.warmup is not None and not 0 <= self.warmup < 1:
            raise ValueError("warmup is a fraction of the steps, in [0, 1)")
        if self.step_in_backward and self.amp_dtype == "fp16" and self.amp is not False:
            raise ValueError(step_in_backward_refusal(fp16_scaling=True, world=1))
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda[:N] or mps")

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["policy"] = str(self.policy) if isinstance(self.policy, CompressionPolicy) else \
            str(CompressionPolicy.parse(self.policy))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (e.g. config.json); unknown keys are ignored, the policy may be a dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("policy"), dict):
            kw["policy"] = str(CompressionPolicy.from_dict(kw["policy"]))
        return cls(**kw)
