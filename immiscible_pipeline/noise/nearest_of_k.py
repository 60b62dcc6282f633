"""Nearest-of-k noise (Improved Immiscible Diffusion): for each sample keep the closest of k Gaussian draws.

Two samplers with the same law:
- `knn_noise_reference` draws the k candidates of D values each, as the official code does (B*k*D Gaussians).
- `knn_noise` draws the winner exactly in distribution from scalars. For n ~ N(0, I_D) and a unit vector
  e = x/||x||, the projection u = e.n ~ N(0, 1), the residual energy r2 = ||n - u e||^2 ~ chi2(D-1) and the
  residual direction are independent, and ||x - n||^2 = (||x|| - u)^2 + r2 depends on (u, r2) only. So the
  k candidates are drawn as k (u, r2) pairs, the nearest pair wins, and only the winner is given a uniformly
  random direction orthogonal to e: about the cost of one noise per sample instead of k.
"""

from __future__ import annotations

import math

import torch


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def sample_gamma(shape_param: float, size: int, generator=None, device="cpu") -> torch.Tensor:
    """Gamma(shape_param, 1) draws in float64, reproducible from a torch.Generator.

    torch's own gamma sampler takes no generator, so this is Marsaglia and Tsang's rejection method
    (exact), vectorised; shape < 1 uses the boost Gamma(a) = Gamma(a + 1) * U^(1/a).
    """
    if shape_param <= 0:
        raise ValueError(f"Gamma shape must be positive, got {shape_param}")
    a = shape_param + 1.0 if shape_param < 1 else shape_param
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, dtype=torch.float64, device=device)
    pending = torch.arange(size, device=device)
    while pending.numel() > 0:
        m = pending.numel()
        z = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        log_v = torch.log(v.clamp_min(1e-300))
        accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
        out[pending[accept]] = d * v[accept]
        pending = pending[~accept]
    if shape_param < 1:
        u = torch.rand(size, generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / shape_param)
    return out


def sample_chi2(df: int, size: int, generator=None, device="cpu") -> torch.Tensor:
    """Chi-squared draws with `df` degrees of freedom (float64); df = 0 is the constant 0."""
    if df == 0:
        return torch.zeros(size, dtype=torch.float64, device=device)
    return 2.0 * sample_gamma(df / 2.0, size, generator, device)


def knn_noise(x0: torch.Tensor, k: int, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest of k N(0, I) candidates for each row of x0, drawn exactly in law at ~1 noise per sample.

    Returns (noise shaped like x0 in float32, distance of the first candidate, distance of the winner);
    the first candidate is an ordinary independent pairing, so the two distances give the reduction.
    """
    batch = x0.shape[0]
    dev = _draw_device(generator, x0.device)
    x = x0.reshape(batch, -1).to(dev, torch.float32)
    dim = x.shape[1]
    norm = x.norm(dim=1)
    u = torch.randn(batch, k, generator=generator, device=dev, dtype=torch.float64)
    r2 = sample_chi2(dim - 1, batch * k, generator, dev).reshape(batch, k)
    dist2 = (norm.double()[:, None] - u).pow(2) + r2
    best = dist2.argmin(dim=1, keepdim=True)
    u_best = u.gather(1, best).float()
    r_best = r2.gather(1, best).sqrt().float()

    # A zero image has no direction; the winner's law is then rotation invariant, so any unit axis will do.
    e = x / norm.clamp_min(1e-30)[:, None]
    e[:, 0] += (norm == 0).to(e.dtype)
    g = torch.randn(batch, dim, generator=generator, device=dev, dtype=torch.float32)
    g.addcmul_(e, torch.linalg.vecdot(g, e)[:, None], value=-1.0)  # keep the part orthogonal to e
    scale = r_best / torch.linalg.vecdot(g, g).sqrt().clamp_min(1e-30)[:, None]
    noise = g.mul_(scale).addcmul_(e, u_best)
    return (noise.reshape(x0.shape).to(x0.device), dist2[:, 0].sqrt().float().to(x0.device),
            dist2.gather(1, best).squeeze(1).sqrt().float().to(x0.device))


def knn_noise_reference(x0: torch.Tensor, k: int, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official recipe: draw k full candidates per sample, keep the nearest. Same returns as knn_noise.

    Candidates are drawn one rank at a time ([B, D] each) and only the running best is kept, so memory stays
    at two noises per sample; the B*k*D Gaussian draws are what makes this slow.
    """
    batch = x0.shape[0]
    dev = _draw_device(generator, x0.device)
    x = x0.reshape(batch, -1).to(dev, torch.float32)
    best = first = best_dist = None
    for _ in range(k):
        cand = torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32)
        dist = (x - cand).norm(dim=1)
        if best is None:
            best, first, best_dist = cand, dist, dist
            continue
        closer = dist < best_dist
        best = torch.where(closer[:, None], cand, best)
        best_dist = torch.where(closer, dist, best_dist)
    return best.reshape(x0.shape).to(x0.device), first.to(x0.device), best_dist.to(x0.device)
