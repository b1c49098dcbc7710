"""Spherical helpers shared by `karcher` and `multislerp`: float64 dots, log/exp steps.

Every tensor is one point: flattened, its direction x/‖x‖ lies on the unit sphere and its norm
is averaged separately. Norms and dot products are summed in float64 over chunks (so a
float32 model's cosines near 1 keep their digits without a float64 copy of the tensor), while
the running mean and tangent vectors are float32 buffers (float64 if the compute dtype is),
two of them whatever K is.

This module imports torch at the top, so method modules import it inside ``merge`` only
(`import mwakit.methods` must stay torch-free).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_CHUNK = 1 << 18
"""Elements per float64 chunk of a dot product (2 MiB per operand)."""


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of two flat tensors, summed in float64 chunk by chunk.

    The partial sums stay on the tensors' device and are read once (one GPU sync per dot).
    """
    n = a.numel()
    if n <= _CHUNK:
        return float(torch.dot(a.double(), b.double()))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        total += torch.dot(a[s:e].double(), b[s:e].double())
    return float(total)


def norm64(a: torch.Tensor) -> float:
    """‖a‖ of a flat tensor, in float64."""
    return math.sqrt(max(dot64(a, a), 0.0))


@dataclass(frozen=True)
class SphereMean:
    """A spherical mean and how it was reached.

    Attributes:
        mean: The result: the mean direction times the weighted mean norm.
        iterations: Tangent steps taken (0 when the Euclidean start already was the mean).
        residual: ‖T‖ of the last tangent mean computed (radians).
    """

    mean: torch.Tensor
    iterations: int
    residual: float


def spherical_mean(
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    max_iter: int,
    tol: float,
    eps: float,
    dtype: torch.dtype,
    normalize: bool = True,
) -> SphereMean:
    """The weighted Karcher mean of the directions of ``xs``, scaled by their mean norm.

    Start from m = Σ ŵ_i u_i / ‖Σ ŵ_i u_i‖ (u_i = x_i/‖x_i‖); each step maps every u_i to the
    tangent space at m, v_i = θ_i/sin θ_i · (u_i − cos θ_i · m) with cos θ_i = ⟨m, u_i⟩, takes
    T = Σ ŵ_i v_i and moves along the geodesic, m ← cos‖T‖ · m + sin‖T‖ · T/‖T‖, until
    ‖T‖ < tol or ``max_iter`` steps. The result is m · Σ w_i ‖x_i‖ (weights as given).

    Points with ‖x_i‖ ≤ eps have no direction: they add their (near-zero) norm to the norm
    average but take no part in the direction, whose weights ŵ are renormalised over the
    others. If the start cancels out (‖Σ ŵ_i u_i‖ ≤ eps, e.g. two antipodal points), the
    heaviest direction is the start.

    Args:
        xs: The points, one shape, any float dtype (not modified).
        weights: w_i ≥ 0, not all 0.
        max_iter: Tangent steps at most (1: one log/exp step from the Euclidean start).
        tol: Stop when ‖T‖ < tol.
        eps: Norm below which a point has no direction.
        dtype: Compute dtype of the buffers (float32, or float64).
        normalize: Divide the weights by their sum (ŵ and the norm average); False uses them
            as given, so scaling every weight by c scales the tangent step and the norm.

    Returns:
        The mean, of the inputs' shape, in ``dtype``.
    """
    shape = xs[0].shape
    # In the compute dtype once: the steps below re-read every point, and an add_ of a
    # bfloat16 tensor into a float32 one is ~20× slower than float32 into float32.
    flat = [x.reshape(-1).to(dtype) for x in xs]
    norms = [norm64(x) for x in flat]
    total_w = sum(weights) if normalize else 1.0
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    live = [i for i, n in enumerate(norms) if n > eps and weights[i] != 0.0]
    if not live or total_w == 0.0:
        return SphereMean(torch.zeros(shape, dtype=dtype, device=xs[0].device), 0, 0.0)
    live_w = sum(weights[i] for i in live) if normalize else 1.0
    w_hat = {i: weights[i] / live_w for i in live}

    m = torch.zeros(flat[0].numel(), dtype=dtype, device=xs[0].device)
    for i in live:
        m.add_(flat[i], alpha=w_hat[i] / norms[i])
    m_norm = norm64(m)
    if m_norm <= eps:
        heaviest = max(live, key=lambda i: w_hat[i])
        m.copy_(flat[heaviest]).div_(norms[heaviest])
    else:
        m.div_(m_norm)

    tangent = torch.empty_like(m)
    steps, residual = 0, 0.0
    for _ in range(max_iter):
        tangent.zero_()
        back = 0.0  # Σ ŵ_i f_i cos θ_i: the component of Σ ŵ_i f_i u_i along m
        for i in live:
            cos = min(1.0, max(-1.0, dot64(m, flat[i]) / norms[i]))
            theta = math.acos(cos)
            # θ/sin θ → 1 as θ → 0; near π the log map is unbounded (antipodal points have
            # no unique geodesic): cap the factor so one such point cannot blow the step up.
            f = 1.0 if theta < 1e-8 else theta / max(math.sin(theta), 1e-8)
            tangent.add_(flat[i], alpha=w_hat[i] * f / norms[i])
            back += w_hat[i] * f * cos
        tangent.sub_(m, alpha=back)
        residual = norm64(tangent)
        if residual < tol or residual == 0.0:
            break
        m.mul_(math.cos(residual)).add_(tangent, alpha=math.sin(residual) / residual)
        m.div_(norm64(m))  # stay on the sphere despite float32 rounding
        steps += 1
    return SphereMean(m.mul_(scale / total_w).reshape(shape), steps, residual)
