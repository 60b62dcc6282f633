"""FID and KID from precomputed features, through torchmetrics.

Features are computed (and gathered across processes) by the caller; torchmetrics does the statistics. Its
metrics are built with a pass-through "network" and `sync_on_compute=False`, so that calling them on the
main process alone never waits for the other processes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _PassThrough(nn.Module):
    """Hands torchmetrics features that are already computed (as float64, for precise statistics)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000,
            seed: int = 0) -> dict:
    """FID and KID between two feature sets [N, D] and [M, D].

    KID averages the unbiased polynomial-kernel MMD over `kid_subsets` random subsets of
    min(kid_subset_size, N, M) samples each (seeded: the same inputs give the same numbers). FID needs at
    least 2 samples per set; with fewer samples than dimensions its covariance is singular and the value is
    biased upwards (compare FIDs only at equal sample counts).
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need feature matrices [N, D] and [M, D], got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_PassThrough(dim), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": yes, they are given
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_PassThrough(dim), subsets=kid_subsets, subset_size=subset,
                                      sync_on_compute=False)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "num_real": len(real), "num_fake": len(fake), "kid_subset_size": subset}
