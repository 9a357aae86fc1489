"""Will this config train? Found out before anything starts (the Train page, `core train`)."""

from __future__ import annotations

from .config import TrainConfig

IMAGE_SIZES = {"features10": 32, "cifar10": 32, "cifar-10": 32}


def check_config(config: TrainConfig) -> list[str]:
    """Problems that would stop `config` from training, found without training: bad values
    (TrainConfig.validate), a policy naming stages the model lacks, and a pooling K larger than
    a feature map of the model at the dataset's image size (one no-grad forward of a single
    blank image). [] when fine."""
    try:
        config.validate()
    except ValueError as e:
        return [str(e)]
    import torch

    from ..method import CompressionPolicy, compress_model
    from ..method.probe import conv_input_shapes, pooled_convs, too_small_for_k
    from ..models import build_model

    policy = CompressionPolicy.parse(config.policy)
    try:  # not on the meta device: its normal_ imports torch._dynamo (slow, once)
        model = compress_model(build_model(config.model, stem=config.stem), policy)
    except ValueError as e:  # an unknown model, or stages the model does not have (PolicyError)
        return [str(e)]
    size = IMAGE_SIZES.get(str(config.dataset).split(":", 1)[0].strip().lower())
    if size is None or policy.pool is None or policy.k == 1:
        return []  # (an image folder's image size is known only once it is loaded)
    shapes = conv_input_shapes(model, torch.zeros(1, 3, size, size))
    too_big = too_small_for_k(policy, shapes, pooled_convs(model, policy))
    if too_big:
        _c, h, w = shapes[too_big[0]]
        return [f"K={policy.k} is larger than the feature map entering {too_big[0]} ({h}x{w})"
                + (f" and {len(too_big) - 1} more layers" if len(too_big) > 1 else "")
                + "; use a smaller K or limit the policy to early stages (e.g. +stages=1,2)"]
    return []
