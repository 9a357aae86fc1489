import pytest
import torch
from torch import nn

from core.models.resnet import MODEL_NAMES, build_model


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,expected", [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6)])
def test_cifar_resnet_sizes_match_he_et_al(name, expected):
    # He et al. 2016, Table 6: 0.27M / 0.46M / 0.85M parameters
    assert abs(n_params(build_model(name)) - expected) / expected < 0.03


def test_resnet18_matches_torchvision_parameter_count():
    import torchvision

    ours = build_model("resnet18", num_classes=1000, stem="imagenet")
    assert n_params(ours) == n_params(torchvision.models.resnet18())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_relu_is_its_own_non_inplace_module(name):
    model = build_model(name)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(not r.inplace for r in relus)
    assert len({id(r) for r in relus}) == len(relus)
    calls = {}
    hooks = [r.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
             for r in relus]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {1}  # each module used exactly once


@pytest.mark.parametrize("stem,size,expected", [("cifar", 32, (4, 4)), ("imagenet", 64, (2, 2))])
def test_stems(stem, size, expected):
    model = build_model("resnet18", stem=stem).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, size, size))
        assert feats.shape[2:] == expected
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*resnet20"):
        build_model("resnet99")
    with pytest.raises(ValueError, match="only has the 'cifar' stem"):
        build_model("resnet20", stem="imagenet")
