import copy
import math

import numpy as np
import pytest
import torch

from core.analysis import activation_max, cka, filters, layers
from core.method.convert import compress_model
from core.models.resnet import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_hooks_empty(model):
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            if len(d):
                return False
    return True


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet20")
    m.train()
    with torch.no_grad():  # non-trivial BN statistics
        for _ in range(2):
            m(torch.randn(32, 3, 32, 32))
    return m.eval()


# -- layer names -------------------------------------------------------------------------

def test_layer_names(model):
    convs = layers.layer_names(model, "conv")
    assert convs[0] == "conv1" and len(convs) == 19
    assert len(layers.layer_names(model, "relu")) == 19
    blocks = layers.layer_names(model, "block")
    assert blocks[0] == "act1" and blocks[1] == "layer1.0" and blocks[-1] == "layer3.2" and len(blocks) == 10
    assert layers.layer_names(model, "stage") == ["layer1", "layer2", "layer3"]
    with pytest.raises(ValueError):
        layers.layer_names(model, "attention")


# -- filter grids ------------------------------------------------------------------------

def test_filter_grid_layout_and_range(model):
    w = model.conv1.weight  # (16, 3, 3, 3)
    for norm in ("per_filter", "global"):
        g = filters.filter_grid(w, normalize=norm)
        assert g.shape == (4 * 3 + 3, 4 * 3 + 3, 3)  # 4x4 tiles of 3x3 with 1 px gaps
        assert g.min() >= 0 and g.max() <= 1
        assert np.all(g[3, :, :] == 1.0) and np.all(g[:, 3, :] == 1.0)  # white gaps
    g = filters.filter_grid(w, normalize="per_filter")
    tile = g[:3, :3]
    assert tile.min() == 0 and tile.max() == 1  # each filter stretched on its own
    assert filters.filter_grid(w, scale=4).shape == (60, 60, 3)
    with pytest.raises(ValueError):
        filters.filter_grid(model.layer1[0].conv1.weight)


def test_channel_grid(model):
    w = model.layer2[0].conv2.weight  # (32, 32, 3, 3)
    g = filters.channel_grid(w, n_filters=8, n_channels=16)
    assert g.shape == (8 * 4 - 1, 16 * 4 - 1)
    assert g.min() >= 0 and g.max() <= 1


# -- spectra -----------------------------------------------------------------------------

def _checkerboard(k):
    i = torch.arange(k)
    return ((-1.0) ** (i.view(-1, 1) + i.view(1, -1))).float()


def test_constant_filter_energy_at_dc():
    w = torch.ones(4, 3, 8, 8)
    freqs, power = filters.radial_power_spectrum(w, pad_to=8)  # no padding: a periodic tile
    assert freqs[0] == 0 and power[0] > 0 and np.allclose(power[1:], 0, atol=1e-9)
    assert filters.high_frequency_share(w, pad_to=8) == pytest.approx(0.0, abs=1e-12)
    # zero-padded 3x3 box (the frequency response): peak at DC, little above half Nyquist
    freqs, power = filters.radial_power_spectrum(torch.ones(3, 3))
    assert np.argmax(power) == 0 and freqs[0] == 0
    assert filters.high_frequency_share(torch.ones(3, 3)) < 0.25


def test_checkerboard_energy_at_nyquist():
    assert filters.high_frequency_share(_checkerboard(8), pad_to=8) == pytest.approx(1.0)
    assert filters.high_frequency_share(_checkerboard(3)) > 0.9
    freqs, power = filters.radial_power_spectrum(_checkerboard(3))
    assert freqs[np.argmax(power)] >= 0.5  # the corner (0.5, 0.5) of the spectrum
    assert freqs.max() <= 0.5 * math.sqrt(2) + 1 / 16


@pytest.mark.parametrize("k,f", [(16, 0.25), (8, 0.125), (3, 0.25)])
def test_grating_peaks_at_its_frequency(k, f):
    x = torch.arange(k, dtype=torch.float64)
    grating = torch.cos(2 * math.pi * f * x).view(1, -1).repeat(k, 1)  # varies along x only
    freqs, power = filters.radial_power_spectrum(grating, pad_to=16)
    assert freqs[np.argmax(power)] == pytest.approx(f, abs=1 / 16 + 1e-9)
    if k >= 8:
        assert freqs[np.argmax(power)] == pytest.approx(f)


def test_spectrum_bins_and_normalize():
    w = torch.randn(8, 3, 3, 3)
    freqs, power = filters.radial_power_spectrum(w, n_bins=10, normalize=True)
    assert len(freqs) <= 10 and power.sum() == pytest.approx(1.0)
    assert np.all(np.diff(freqs) > 0)


def test_normalized_spectrum_is_the_energy_share_of_each_ring():
    """The app draws normalized spectra above the bars of high_frequency_share: the rings right of
    half Nyquist must hold that share (to a ring's width, 1/16 cycles/pixel), not the quarter the
    ring means summed to (the two figures contradicted each other)."""
    torch.manual_seed(0)
    w = torch.randn(16, 3, 3, 3)
    freqs, share = filters.radial_power_spectrum(w, normalize=True)
    hf = filters.high_frequency_share(w)
    assert share.sum() == pytest.approx(1.0)
    assert share[freqs >= 0.25 + 1 / 32].sum() <= hf <= share[freqs >= 0.25 - 1 / 32].sum()
    freqs_m, mean = filters.radial_power_spectrum(w)
    assert mean[freqs_m >= 0.25 + 1 / 32].sum() / mean.sum() < hf - 0.2  # what the plot showed before


def test_layer_spectra(model):
    spectra = filters.layer_spectra(model)
    assert [s["name"] for s in spectra] == layers.layer_names(model, "conv")
    for s in spectra:
        assert s["hf_share"] == pytest.approx(filters.high_frequency_share(model.get_submodule(s["name"]).weight))
        assert s["power"].sum() == pytest.approx(1.0) and len(s["freqs"]) == len(s["power"])


# -- feature maps, predictions -----------------------------------------------------------

def test_feature_maps_restore_state(model):
    model.train()
    bn_before = model.layer2[0].bn1.running_mean.clone()
    try:
        x = torch.randn(2, 3, 32, 32)
        out = layers.feature_maps(model, "layer2.0", x)
        assert out.shape == (2, 32, 16, 16) and not out.requires_grad
        assert model.training and all(m.training for m in model.modules())
        assert torch.equal(model.layer2[0].bn1.running_mean, bn_before)  # ran in eval mode
        assert _all_hooks_empty(model)
        with pytest.raises(ValueError):
            layers.feature_maps(model, "layer9", x)
        assert _all_hooks_empty(model)
    finally:
        model.eval()


def test_prediction_and_denormalize(model):
    x = torch.rand(3, 3, 32, 32)
    p = layers.prediction(model, x)
    assert p.shape == (3, 10) and torch.allclose(p.sum(1), torch.ones(3))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    img = layers.denormalize(xn, mean, std)
    assert img.shape == (3, 32, 32, 3) and np.allclose(img, x.permute(0, 2, 3, 1).numpy(), atol=1e-6)


# -- activation maximisation -------------------------------------------------------------

def test_maximize_activation(model):
    grads = {n: p.grad for n, p in model.named_parameters()}
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    a = activation_max.maximize_activation(model, "layer2.1", channel=3, steps=24, seed=0, mean=mean, std=std)
    b = activation_max.maximize_activation(model, "layer2.1", channel=3, steps=24, seed=0, mean=mean, std=std)
    c = activation_max.maximize_activation(model, "layer2.1", channel=3, steps=24, seed=1, mean=mean, std=std)
    start = activation_max.maximize_activation(model, "layer2.1", channel=3, steps=0, seed=0, mean=mean, std=std)
    assert a.shape == (32, 32, 3) and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert _all_hooks_empty(model)
    assert all(p.grad is grads[n] for n, p in model.named_parameters())

    def act(img):
        x = (torch.tensor(img).permute(2, 0, 1)[None].float() - torch.tensor(mean).view(1, 3, 1, 1)) \
            / torch.tensor(std).view(1, 3, 1, 1)
        return layers.feature_maps(model, "layer2.1", x)[0, 3].mean().item()

    assert act(a) > act(start) + 0.1


def test_maximize_activations_batch_and_logits(model):
    imgs = activation_max.maximize_activations(model, "fc", [0, 5], steps=16)
    start = activation_max.maximize_activations(model, "fc", [0, 5], steps=0)
    assert imgs.shape == (2, 32, 32, 3)
    assert _all_hooks_empty(model)
    with torch.no_grad():  # mean/std None: the images are fed as they are
        gain = model(torch.tensor(imgs).permute(0, 3, 1, 2).float()) - model(
            torch.tensor(start).permute(0, 3, 1, 2).float())
    # each image raised its own logit, and more than the other image's channel rose in it
    assert gain[0, 0] > 0 and gain[1, 5] > 0
    assert gain[0, 0] - gain[0, 5] > 0 and gain[1, 5] - gain[1, 0] > 0


# -- CKA ---------------------------------------------------------------------------------

def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 20, generator=g, dtype=torch.float64)
    Y = X[:, :10] @ torch.randn(10, 15, generator=g, dtype=torch.float64) + 0.5 * torch.randn(64, 15, generator=g,
                                                                                               dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    base = cka.linear_cka(X, Y)
    assert cka.linear_cka(X, X) == pytest.approx(1.0)
    assert 0 < base < 1
    assert cka.linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert cka.linear_cka(3.7 * X, Y) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    assert cka.linear_cka(X + 5.0, Y) == pytest.approx(base, rel=1e-9)  # centring
    d = torch.ones(20, dtype=torch.float64)
    d[:5] = 10.0
    assert abs(cka.linear_cka(X * d, Y) - base) > 1e-2  # anisotropic scaling changes it
    assert cka.linear_cka(Y, X) == pytest.approx(base, rel=1e-12)  # symmetric
    assert cka.linear_cka(X.numpy(), Y.numpy()) == pytest.approx(base)
    with pytest.raises(ValueError):
        cka.linear_cka(X, Y[:10])


def test_cka_matrix(model):
    torch.manual_seed(1)
    other = build_model("resnet20").eval()
    x = torch.randn(24, 3, 32, 32)
    na, nb, m = cka.cka_matrix(model, model, x, batch_size=10)
    assert na == nb == layers.layer_names(model, "block") and m.shape == (10, 10)
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
    na, nb, m2 = cka.cka_matrix(model, other, x, layers_b=["layer1.0", "layer3.2"])
    assert nb == ["layer1.0", "layer3.2"] and m2.shape == (10, 2)
    assert np.all((m2 >= -1e-9) & (m2 <= 1 + 1e-9))
    # the matrix agrees with linear_cka on flattened activations
    fa = layers.feature_maps(model, "layer1.1", x).reshape(24, -1)
    fb = layers.feature_maps(other, "layer3.2", x).reshape(24, -1)
    assert m2[na.index("layer1.1"), 1] == pytest.approx(cka.linear_cka(fa, fb), rel=1e-5)
    assert _all_hooks_empty(model) and _all_hooks_empty(other)


def test_checkpointed_and_compressed_models(model):
    x = torch.randn(2, 3, 32, 32)
    for policy in ("ckpt", "avg2+mask"):
        m = compress_model(copy.deepcopy(model), policy)
        assert torch.allclose(layers.feature_maps(m, "layer2.1.conv1", x),
                              layers.feature_maps(model, "layer2.1.conv1", x))
        img = activation_max.maximize_activation(m, "layer2.1.conv1", 0, steps=2)
        assert img.shape == (32, 32, 3) and _all_hooks_empty(m)
        if policy == "ckpt":
            assert m.layer2[1].checkpointed is True  # switched off only inside the call
