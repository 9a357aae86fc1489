import copy

import numpy as np
import pytest
import torch

from core.analysis import attribution as A
from core.method.convert import compress_model
from core.models.resnet import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"integrated_gradients": {"n_steps": 16}, "gradient_shap": {"n_samples": 4},
        "occlusion": {"window": 8, "stride": 4}}


def _hooks(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for name, m in model.named_modules()}


def _warm(seed):
    torch.manual_seed(seed)
    m = build_model("resnet20")
    m.train()
    with torch.no_grad():  # non-trivial BN statistics: the network is no longer homogeneous
        for _ in range(2):
            m(torch.randn(32, 3, 32, 32) * 1.5 + 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _warm(0)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", A.METHODS)
def test_attribute_shapes_hooks_grads_and_mode(model, x, method):
    marker = torch.full_like(model.conv1.weight, 7.0)
    model.conv1.weight.grad = marker
    model.train()
    bn_mean = model.layer1[0].bn1.running_mean.clone()
    x_before = x.clone()
    try:
        maps = A.attribute(model, x, target=3, method=method, **FAST.get(method, {}))
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and not maps.requires_grad
        assert maps.abs().sum() > 0
        assert all(v == (0, 0, 0, 0) for v in _hooks(model).values())
        assert model.conv1.weight.grad is marker and torch.equal(marker, torch.full_like(marker, 7.0))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
        assert all(m.training for m in model.modules())  # train/eval flags restored
        assert torch.equal(model.layer1[0].bn1.running_mean, bn_mean)  # ran in eval mode
        assert torch.equal(x, x_before) and not x.requires_grad
        if method in ("saliency", "gradcam"):
            assert (maps >= 0).all()
    finally:
        model.conv1.weight.grad = None
        model.eval()


def test_integrated_gradients_completeness(model):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    target = torch.tensor([0, 3, 5, 9])
    maps, delta = A.attribute(model, x, target, "integrated_gradients", n_steps=64, return_delta=True)
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, target.view(-1, 1)).squeeze(1)
    total = maps.sum((1, 2))
    # the map sums (over pixels and channels) to F(x) - F(baseline) for the target logit
    assert torch.allclose(total - gap, delta.to(total), atol=1e-4)
    assert (total - gap).abs().sum() <= 0.05 * gap.abs().sum()



def test_saliency_is_the_input_gradient_and_occlusion_the_drop_of_the_logit(model, x):
    """Both maps computed by hand: |d logit / d pixel| summed over colour channels, and, for
    non-overlapping 8x8 patches, how much the target logit falls when the patch is zeroed."""
    target = torch.tensor([3, 7])
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), xg)
    torch.testing.assert_close(A.attribute(model, x, target, "saliency"), grad.abs().sum(1))

    maps = A.attribute(model, x, target, "occlusion", window=8, stride=8)
    with torch.no_grad():
        full = model(x).gather(1, target.view(-1, 1)).squeeze(1)
        for i in range(0, 32, 8):
            for j in range(0, 32, 8):
                hole = x.clone()
                hole[:, :, i:i + 8, j:j + 8] = 0
                drop = full - model(hole).gather(1, target.view(-1, 1)).squeeze(1)
                torch.testing.assert_close(maps[:, i:i + 8, j:j + 8],
                                           drop.view(2, 1, 1).expand(2, 8, 8), atol=1e-5, rtol=1e-4)

def test_target_none_uses_prediction(model, x):
    pred = model(x).argmax(1)
    assert torch.allclose(A.attribute(model, x, None, "saliency"), A.attribute(model, x, pred, "saliency"))


def test_gradient_shap_deterministic_and_rng_untouched(model, x):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = A.attribute(model, x, 1, "gradient_shap", n_samples=4, seed=3)
    b = A.attribute(model, x, 1, "gradient_shap", n_samples=4, seed=3)
    assert torch.equal(a, b)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_compressed_model_gives_the_same_attributions(model, x):
    compressed = compress_model(copy.deepcopy(model), "avg2+mask")
    assert type(compressed.layer1[0].conv1).__name__ == "CompressedConv2d"
    for method in A.METHODS:
        kw = FAST.get(method, {})
        a = A.attribute(model, x, 2, method, **kw)
        b = A.attribute(compressed, x, 2, method, **kw)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max())), method
        assert all(v == (0, 0, 0, 0) for v in _hooks(compressed).values())


def test_unknown_method(model, x):
    with pytest.raises(ValueError):
        A.attribute(model, x, 0, "deconvolution")
    with pytest.raises(ValueError):
        A.attribute(model, x, 0, "saliency", return_delta=True)


def test_spearman_and_topk():
    a = np.arange(100, dtype=float)
    assert A.spearman(a, a ** 3) == pytest.approx(1.0)
    assert A.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(A.spearman(a, np.ones(100)))
    ties = np.array([1.0, 1.0, 2.0, 3.0])
    assert A.spearman(ties, np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486833, rel=1e-6)  # scipy's
    assert A._rankdata(ties).tolist() == [1.5, 1.5, 3.0, 4.0]
    assert A.topk_iou(a, a, k=10) == 1.0
    assert A.topk_iou(a, -a, k=10) == 0.0
    b = a.copy()
    b[[99, 98]] = -1  # 2 of the top 10 swapped out: IoU = 8 / 12
    assert A.topk_iou(a, b, k=10) == pytest.approx(8 / 12)


def test_compare_models(model, x):
    twin = copy.deepcopy(model)
    other = _warm(1)
    models = {"baseline": model, "twin": twin, "other": other}
    res = A.compare_models(models, x, "integrated_gradients", n_steps=8)
    assert res["names"] == ["baseline", "twin", "other"]
    assert torch.equal(res["targets"], model(x).argmax(1))
    for name in models:
        assert res["attributions"][name].shape == (2, 32, 32)
        p = res["predictions"][name]
        assert p["class"].shape == (2,) and ((p["confidence"] > 0) & (p["confidence"] <= 1)).all()
    assert set(res["agreement"]) == {("baseline", "twin"), ("baseline", "other"), ("twin", "other")}
    same = res["agreement"][("baseline", "twin")]
    assert np.allclose(same["spearman"], 1.0) and np.allclose(same["topk_iou"], 1.0)
    diff = res["agreement"][("baseline", "other")]
    assert diff["spearman"].shape == (2,) and (diff["spearman"] < 0.999).all()
    a_maps, o_maps = res["attributions"]["baseline"], res["attributions"]["other"]
    for i in range(2):  # per image, on |map|: the pair's figures are those of the two maps
        assert diff["spearman"][i] == pytest.approx(A.spearman(a_maps[i].abs(), o_maps[i].abs()))
        assert diff["topk_iou"][i] == pytest.approx(A.topk_iou(a_maps[i].abs(), o_maps[i].abs()))
    names, m = A.agreement_matrix(res, "topk_iou")
    assert names == res["names"] and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    res2 = A.compare_models({"a": model, "b": other}, x, "saliency", targets=[4, 4], k=5)
    assert res2["targets"].tolist() == [4, 4] and res2["k"] == 5
    for m_ in models.values():
        assert all(v == (0, 0, 0, 0) for v in _hooks(m_).values())
