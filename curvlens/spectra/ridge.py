r"""Deterministic-equivalent test error of ridge regression on given features.

Schröder, Dmitriev, Cui & Loureiro, "Asymptotics of Learning with Deep Structured (Random)
Features" (2024, arXiv:2402.13999), characterize the test error of a ridge readout trained on
features :math:`\phi` through their population covariance alone. For

.. math:: \hat w = \arg\min_w \frac1n \sum_{i=1}^n (y_i - w^T\phi_i)^2 + \lambda \|w\|^2
          = (\Phi^T\Phi / n + \lambda)^{-1} \Phi^T y / n

with :math:`\Omega = E[\phi\phi^T]`, :math:`\psi = E[\phi y]`, :math:`\kappa` solving
:math:`\kappa = \lambda + \frac{\kappa}{n}\mathrm{Tr}[\Omega(\Omega+\kappa)^{-1}]`,

.. math::
    E_{test} = \frac{E[y^2] - \psi^T(\Omega+2\kappa)(\Omega+\kappa)^{-2}\psi}
                    {1 - \mathrm{Tr}[\Omega^2(\Omega+\kappa)^{-2}]/n}
    = E[(y - \hat w^T\phi)^2]

on a fresh sample, *including* the irreducible noise: for a linear teacher
:math:`y = \theta^T\phi + \varepsilon` it reads
:math:`(\sigma_\varepsilon^2 + \kappa^2\theta^T\Omega(\Omega+\kappa)^{-2}\theta)/(1 - df_2/n)`.
Several outputs (``psi`` ``[p, k]``) add up: ``E[||y||^2]`` minus the sum over columns.

Deep (rainbow) networks: with :math:`h_l = W_l\phi_{l-1}` scaled by ``scale`` (the paper's
:math:`1/p_{l-1}` for :math:`O(1)` weights, 1 for a torch layer),
:math:`C_l = \mathrm{scale}\cdot W_l\Omega_{l-1}W_l^T`, :math:`\xi \sim N(0,1)`,
:math:`r^2 = \mathrm{mean\,diag}\,C_l`, :math:`\mu_1 = E[\xi\varphi(r\xi)]/r`,
:math:`v = E[\varphi(r\xi)^2]`, the linearization is
:math:`\Omega_l = \mu_1^2 C_l + (v - \mu_1^2 r^2) I` (per neuron: :math:`r_i^2 = (C_l)_{ii}`,
:math:`\Omega_l = M C_l M + \mathrm{diag}(v_i - \mu_{1,i}^2 r_i^2)`, :math:`M = \mathrm{diag}\,
\mu_{1,i}`), exact on the diagonal in the per-neuron form and up to :math:`O(C_{ij}^3)` (odd
activations) off it. Gaussian expectations use Gauss-Hermite quadrature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from curvlens.spectra._features import layer_features

__all__ = [
    "ridge_kappa",
    "ridge_test_error",
    "RidgeCurve",
    "ridge_learning_curve",
    "ridge_fit",
    "gaussian_moments",
    "gaussian_activation_covariance",
    "linearized_layer_covariance",
    "deep_linearized_covariance",
    "feature_learning_curve",
]


def _eig(omega: Tensor) -> tuple[np.ndarray, np.ndarray]:
    om = torch.as_tensor(omega, dtype=torch.float64).cpu()
    if om.dim() != 2 or om.shape[0] != om.shape[1]:
        raise ValueError(f"Omega must be a square [p, p] matrix, got shape {tuple(om.shape)}")
    w, v = torch.linalg.eigh(0.5 * (om + om.T))
    return w.clamp_min(0).numpy(), v.numpy()


def _kappa(w: np.ndarray, n: float, lam: float) -> float:
    """Root of kappa (1 - df1(kappa)/n) = lam, by bisection on log kappa."""
    if n <= 0:
        raise ValueError(f"the number of samples n must be positive, got {n!r}")
    if lam < 0:
        raise ValueError(f"the ridge penalty lambda must be >= 0, got {lam!r}")

    def h(k: float) -> float:
        return k * (1.0 - np.sum(w / (w + k)) / n) - lam

    hi = lam + w.sum() / n + 1e-300
    if lam == 0.0:
        if np.count_nonzero(w > w.max() * 1e-12) <= n:
            return 0.0  # under-parametrized ridgeless: no implicit regularization
        lo = hi * 1e-16
        while h(lo) > 0:
            lo *= 1e-4
    else:
        lo = lam
    lo, hi = np.log(lo), np.log(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if h(np.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-15:
            break
    return float(np.exp(0.5 * (lo + hi)))


def ridge_kappa(omega: Tensor, n: float, lam: float) -> float:
    r"""The effective regularization :math:`\kappa` of ridge with ``n`` samples.

    Solves :math:`\kappa = \lambda + \frac{\kappa}{n}\mathrm{Tr}[\Omega(\Omega+\kappa)^{-1}]`
    (unique root :math:`\ge \lambda`; for :math:`\lambda = 0` it is 0 when ``n`` exceeds the
    rank of :math:`\Omega`).

    Example:
        >>> import torch
        >>> round(ridge_kappa(torch.eye(2, dtype=torch.float64), n=4, lam=0.5), 6)   # kappa^2 = 1/2
        0.707107
    """
    w, _ = _eig(omega)
    return _kappa(w, float(n), float(lam))


def _error(w: np.ndarray, psi2: np.ndarray, y2: float, n: float, lam: float) -> tuple:
    k = _kappa(w, n, lam)
    pos = w > 0
    wp, kp = w[pos], k
    explained = float(np.sum(psi2[pos] * (wp + 2 * kp) / (wp + kp) ** 2))
    df2 = float(np.sum(wp**2 / (wp + kp) ** 2))
    denom = 1.0 - df2 / n
    err = (y2 - explained) / denom if denom > 0 else float("inf")
    return k, err


def ridge_test_error(omega: Tensor, psi: Tensor, y2: float, n: float, lam: float) -> float:
    r"""Deterministic-equivalent test MSE :math:`E[(y - \hat w^T\phi)^2]` (noise included).

    Args:
        omega: ``[p, p]`` feature second moment :math:`E[\phi\phi^T]`.
        psi: ``[p]`` or ``[p, k]`` :math:`E[\phi y^T]`.
        y2: :math:`E[\|y\|^2]`.
        n: training samples; ``lam``: the penalty :math:`\lambda \ge 0` of the objective
            :math:`\frac1n\sum(y - w^T\phi)^2 + \lambda\|w\|^2`.

    Returns:
        The predicted test error (``inf`` for ridgeless interpolation at ``n = p``).

    Example:
        >>> import torch
        >>> om = torch.eye(3, dtype=torch.float64)
        >>> round(ridge_test_error(om, torch.zeros(3, dtype=torch.float64), 1.0, 30, 0.0), 6)
        1.111111
    """
    w, v = _eig(omega)
    ps = torch.as_tensor(psi, dtype=torch.float64).cpu().numpy()
    ps = ps[:, None] if ps.ndim == 1 else ps
    if ps.shape[0] != w.size:
        raise ValueError(f"psi has {ps.shape[0]} rows but Omega is {w.size} x {w.size}")
    psi2 = np.sum((v.T @ ps) ** 2, axis=1)
    return _error(w, psi2, float(y2), float(n), float(lam))[1]


@dataclass(frozen=True)
class RidgeCurve:
    """A predicted learning curve: ``test_error[i]`` and ``kappa[i]`` at ``n[i]`` samples."""

    n: np.ndarray
    test_error: np.ndarray
    kappa: np.ndarray
    lam: float


def ridge_learning_curve(
    omega: Tensor, psi: Tensor, y2: float, n_values: Sequence[float], lam: float
) -> RidgeCurve:
    """:func:`ridge_test_error` over a grid of sample sizes (one eigendecomposition).

    Example:
        >>> import torch
        >>> c = ridge_learning_curve(torch.eye(2, dtype=torch.float64),
        ...                          torch.ones(2, dtype=torch.float64), 2.0, [4, 40], 0.1)
        >>> bool(c.test_error[1] < c.test_error[0])
        True
    """
    w, v = _eig(omega)
    ps = torch.as_tensor(psi, dtype=torch.float64).cpu().numpy()
    ps = ps[:, None] if ps.ndim == 1 else ps
    if ps.shape[0] != w.size:
        raise ValueError(f"psi has {ps.shape[0]} rows but Omega is {w.size} x {w.size}")
    psi2 = np.sum((v.T @ ps) ** 2, axis=1)
    out = [_error(w, psi2, float(y2), float(n), float(lam)) for n in n_values]
    return RidgeCurve(np.asarray(n_values, dtype=float), np.array([e for _, e in out]),
                      np.array([k for k, _ in out]), float(lam))


def ridge_fit(phi: Tensor, y: Tensor, lam: float) -> Tensor:
    r"""The ridge estimator :math:`(\Phi^T\Phi/n + \lambda)^{-1}\Phi^Ty/n` (``[p]`` or ``[p, k]``).

    Uses the smaller of the two Gram matrices, so ``lam = 0`` gives the minimum-norm solution
    when ``n < p``.
    """
    n, p = phi.shape
    if lam == 0:
        return torch.linalg.lstsq(phi, y, driver="gelsd").solution
    if n >= p:
        a = phi.T @ phi / n + lam * torch.eye(p, dtype=phi.dtype)
        return torch.linalg.solve(a, phi.T @ y / n)
    a = phi @ phi.T / n + lam * torch.eye(n, dtype=phi.dtype)
    return phi.T @ torch.linalg.solve(a, y) / n


# --------------------------------------------------------------------------- deep features

Activation = Callable[[Tensor], Tensor]


def _gh(order: int) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.hermite_e.hermegauss(order)
    return torch.from_numpy(x), torch.from_numpy(w / w.sum())


def gaussian_moments(activation: Activation, r: Tensor, order: int = 201) -> tuple[Tensor, Tensor]:
    r""":math:`(\mu_1, v) = (E[\xi\varphi(r\xi)]/r,\ E[\varphi(r\xi)^2])` for each ``r`` ``[d]``.

    Example:
        >>> import torch
        >>> mu1, v = gaussian_moments(lambda t: t, torch.tensor([2.0], dtype=torch.float64))
        >>> round(float(mu1), 12), round(float(v), 12)
        (1.0, 4.0)
    """
    x, w = _gh(order)
    r = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
    if torch.any(r <= 0):
        raise ValueError("pre-activation standard deviations r must be positive")
    vals = activation(r[:, None] * x[None, :])  # [d, order]
    mu1 = (vals * x * w).sum(1) / r
    v = (vals**2 * w).sum(1)
    return mu1, v


def gaussian_activation_covariance(c: Tensor, activation: Activation, order: int = 101) -> Tensor:
    r"""Exact :math:`E[\varphi(h)\varphi(h)^T]` for :math:`h \sim N(0, C)` by 2-D Gauss-Hermite.

    ``O(d^2 order^2)`` work: a reference for small ``d``.
    """
    c = torch.as_tensor(c, dtype=torch.float64)
    d = c.shape[0]
    x, w = _gh(order)
    z1, z2 = x[:, None], x[None, :]
    w2 = w[:, None] * w[None, :]
    out = torch.empty(d, d, dtype=torch.float64)
    sd = torch.diagonal(c).clamp_min(0).sqrt()
    for i in range(d):
        rho = (c[i] / (sd[i] * sd).clamp_min(1e-300)).clamp(-1, 1)  # [d]
        hi = sd[i] * z1  # [o, 1]
        hj = sd[:, None, None] * (rho[:, None, None] * z1 + (1 - rho**2).sqrt()[:, None, None] * z2)
        out[i] = (activation(hi)[None] * activation(hj) * w2).sum((1, 2))
    return 0.5 * (out + out.T)


def linearized_layer_covariance(
    weight: Tensor,
    omega_prev: Tensor,
    activation: Activation,
    *,
    scale: float | None = None,
    per_neuron: bool = False,
    order: int = 201,
) -> tuple[Tensor, Tensor]:
    r"""One rainbow layer: ``(Omega_l, C_l)`` from :math:`\Omega_{l-1}` (see module docstring).

    Args:
        weight: ``[p_l, p_{l-1}]`` (torch ``nn.Linear`` layout).
        omega_prev: ``[p_{l-1}, p_{l-1}]`` second moment of the layer's input.
        activation: elementwise :math:`\varphi` acting on float64 tensors (e.g. ``torch.tanh``).
        scale: pre-activation covariance factor; default ``1 / p_{l-1}`` (the paper's
            convention for :math:`O(1)` weights); pass 1.0 for a torch layer ``h = W phi``.
        per_neuron: use each neuron's own variance :math:`r_i^2 = (C_l)_{ii}`.
        order: Gauss-Hermite nodes.

    Returns:
        ``Omega_l`` ``[p_l, p_l]`` and ``C_l`` ``[p_l, p_l]``.
    """
    wt = torch.as_tensor(weight, dtype=torch.float64)
    om = torch.as_tensor(omega_prev, dtype=torch.float64)
    if wt.dim() != 2 or om.shape != (wt.shape[1], wt.shape[1]):
        raise ValueError(
            f"weight {tuple(wt.shape)} and Omega_prev {tuple(om.shape)} do not chain: need "
            "weight [p_l, p_prev] and Omega_prev [p_prev, p_prev]"
        )
    s = 1.0 / wt.shape[1] if scale is None else float(scale)
    c = s * wt @ om @ wt.T  # [p_l, p_l]
    c = 0.5 * (c + c.T)
    diag = torch.diagonal(c)
    if per_neuron:
        r = diag.clamp_min(1e-300).sqrt()
        mu1, v = gaussian_moments(activation, r, order)
        omega = mu1[:, None] * c * mu1[None, :] + torch.diag(v - mu1**2 * r**2)
    else:
        r = diag.mean().clamp_min(1e-300).sqrt()
        mu1, v = gaussian_moments(activation, r.reshape(1), order)
        omega = mu1**2 * c + (v - mu1**2 * r**2) * torch.eye(c.shape[0], dtype=c.dtype)
    return omega, c


def deep_linearized_covariance(
    weights: Iterable[Tensor],
    activations: Activation | Iterable[Activation],
    omega0: Tensor,
    **kwargs,
) -> Tensor:
    """:func:`linearized_layer_covariance` chained through ``weights`` from input ``omega0``.

    ``activations`` is one callable for all layers or one per layer; ``kwargs`` go to each layer.
    """
    weights = list(weights)
    acts = [activations] * len(weights) if callable(activations) else list(activations)
    if len(acts) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(acts)} activations")
    omega = torch.as_tensor(omega0, dtype=torch.float64)
    for wt, act in zip(weights, acts):
        omega, _ = linearized_layer_covariance(wt, omega, act, **kwargs)
    return omega


def _targets(y: Tensor, n: int) -> Tensor:
    y = torch.as_tensor(y)
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} targets for {n} samples")
    if not torch.is_floating_point(y):
        y = torch.nn.functional.one_hot(y.long().reshape(-1)).to(torch.float64)
    y = y.to("cpu", torch.float64)
    return y[:, None] if y.dim() == 1 else y.flatten(1)


def feature_learning_curve(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: Tensor | Iterable[Tensor],
    targets: Tensor,
    n_values: Sequence[float],
    lam: float,
    *,
    bias: bool = False,
) -> RidgeCurve:
    """Predicted learning curve of a ridge readout trained on ``layer``'s output features.

    Omega, psi and E[||y||^2] are estimated from the features of ``inputs`` (all samples); the
    curve is then :func:`ridge_learning_curve`. Compare it to ridge fitted on ``n`` of these
    samples (:func:`ridge_fit`) to see whether the features behave like Gaussian ones.

    Args:
        model, layer: the network and the module whose outputs (flattened) are the features.
        inputs: ``[N, ...]`` batch or iterable of batches.
        targets: ``[N]`` or ``[N, k]`` floats, or ``[N]`` integer labels (one-hot encoded).
        n_values, lam: sample sizes and penalty.
        bias: append a constant feature 1 (a penalized intercept).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        >>> x = torch.randn(400, 5)
        >>> curve = feature_learning_curve(net, "1", x, x[:, 0], [20, 200], 1e-3)
        >>> bool(curve.test_error[1] < curve.test_error[0])
        True
    """
    phi = layer_features(model, layer, inputs)  # [N, p]
    if bias:
        phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype)], 1)
    y = _targets(targets, phi.shape[0])  # [N, k]
    N = phi.shape[0]
    omega = phi.T @ phi / N
    psi = phi.T @ y / N
    y2 = float((y**2).sum(1).mean())
    return ridge_learning_curve(omega, psi, y2, n_values, lam)
