"""Linear CKA (Kornblith et al. 2019) between the layers of two models on the same batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .layers import capture, eval_mode, layer_names

# ---------------------------------------------------------------------------------------
# Linear CKA (Kornblith et al. 2019)
# ---------------------------------------------------------------------------------------

def _gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, ...) activations -> centred linear Gram matrix (n, n), returned in float64.

    Columns are centred before the product (no large-mean cancellation), so a float32
    product (`dtype`) is accurate to ~1e-6 and twice as fast for wide layers."""
    x = x.reshape(x.shape[0], -1).to(dtype)
    x = x - x.mean(0, keepdim=True)
    return (x @ x.T).to(torch.float64)


def linear_cka(X, Y) -> float:
    """Linear CKA of two (n, features) matrices over the same n examples.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = Xc Xc^T, L = Yc Yc^T (columns
    centred), computed from n x n Gram matrices so wide layers cost nothing extra. 1 for
    identical representations; invariant to orthogonal transforms and isotropic scaling,
    not to anisotropic scaling. Symmetric.
    """
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    Y = torch.as_tensor(np.asarray(Y) if not isinstance(Y, torch.Tensor) else Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y need the same number of examples, got {X.shape[0]} and {Y.shape[0]}")
    return _cka_from_grams(_gram(X), _gram(Y))


def _cka_from_grams(K: torch.Tensor, L: torch.Tensor) -> float:
    denom = torch.linalg.norm(K) * torch.linalg.norm(L)
    return float((K * L).sum() / denom) if denom > 0 else float("nan")


@torch.no_grad()
def _layer_grams(model: nn.Module, names: Sequence[str], x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Centred, unit-Frobenius-norm Gram matrices of each layer's flattened output on x."""
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with eval_mode(model), capture(model, names, fn=lambda o: o.detach()) as out:
        for start in range(0, x.shape[0], batch_size):
            model(x[start: start + batch_size])
            for n in names:  # keep flattened features; Gram needs all examples together
                feats[n].append(out[n].reshape(out[n].shape[0], -1).float())
            out.clear()
    grams = []
    for n in names:
        K = _gram(torch.cat(feats.pop(n)), torch.float32).cpu()
        norm = torch.linalg.norm(K)
        grams.append(K / norm if norm > 0 else K)
    return grams


def cka_matrix(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, layers_a: Sequence[str] | None = None,
               layers_b: Sequence[str] | None = None, batch_size: int = 256):
    """Linear CKA between every layer of model A and every layer of model B on batch x.

    Default layers: `layer_names(model, "block")` (stem output + every residual block output).
    Activations are flattened per example; eval mode. Returns (names_a, names_b, matrix)
    with matrix[i, j] = CKA(A's layer i, B's layer j) as a float64 array.
    """
    names_a = list(layers_a) if layers_a is not None else layer_names(model_a, "block")
    names_b = list(layers_b) if layers_b is not None else layer_names(model_b, "block")
    ga = _layer_grams(model_a, names_a, x, batch_size)
    gb = _layer_grams(model_b, names_b, x, batch_size)
    A = torch.stack([g.flatten() for g in ga])  # (La, n*n)
    B = torch.stack([g.flatten() for g in gb])  # (Lb, n*n)
    return names_a, names_b, (A @ B.T).numpy()
