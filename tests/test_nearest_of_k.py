"""KNN noise: the reference keeps the nearest candidate; the fast sampler has the same law."""

import pytest
import torch
from scipy import stats

from immiscible_pipeline import ImmiscibleNoise, knn_noise, knn_noise_reference
from immiscible_pipeline.noise.nearest_of_k import sample_chi2


def test_reference_keeps_the_nearest_of_its_candidates():
    x0 = torch.randn(16, 2, 3, 3)
    k = 5
    noise, first, best = knn_noise_reference(x0, k, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    candidates = torch.stack([torch.randn(16, 18, generator=g) for _ in range(k)], dim=1)
    dist = (x0.reshape(16, 1, -1) - candidates).norm(dim=-1)
    expected = candidates[torch.arange(16), dist.argmin(1)]
    assert torch.allclose(noise.reshape(16, -1), expected)
    assert torch.allclose(best, dist.min(1).values)
    assert torch.allclose(first, dist[:, 0])


def test_k_one_is_plain_noise_distance():
    x0 = torch.randn(4000, 8)
    noise, first, best = knn_noise(x0, 1, torch.Generator().manual_seed(1))
    assert torch.equal(first, best)
    # one candidate: the noise is plain N(0, I), and its distance is the one to that noise
    assert abs(noise.mean().item()) < 0.03 and noise.var().item() == pytest.approx(1.0, abs=0.04)
    torch.testing.assert_close(best, (x0 - noise).norm(dim=1))


@pytest.mark.parametrize("df", [1, 2, 5, 63, 4095])
def test_chi2_sampler_matches_the_chi2_law(df):
    draws = sample_chi2(df, 20000, torch.Generator().manual_seed(df)).numpy()
    assert stats.kstest(draws, stats.chi2(df).cdf).pvalue > 1e-3


def _features(x, noise):
    """Statistics of a noise relative to its sample: distance, projection on x, off-axis projection, energy."""
    e = x / x.norm(dim=1, keepdim=True)
    off = torch.zeros_like(x)
    off[:, 1] = 1.0
    off = off - (off * e).sum(1, keepdim=True) * e
    off = off / off.norm(dim=1, keepdim=True)
    return {
        "distance": (x - noise).norm(dim=1),
        "projection": (noise * e).sum(1),
        "off_axis": (noise * off).sum(1),
        "energy": noise.pow(2).sum(1),
    }


@pytest.mark.parametrize("dim, k", [(3, 8), (64, 8), (64, 64)])
def test_fast_sampler_has_the_law_of_the_reference(dim, k):
    n = 4000
    x = torch.full((n, dim), 0.0)
    x[:, 0] = 1.5  # a fixed sample, repeated: each row is one independent draw of its KNN noise
    x[:, 1] = -0.5
    fast, _, _ = knn_noise(x, k, torch.Generator().manual_seed(10))
    ref, _, _ = knn_noise_reference(x, k, torch.Generator().manual_seed(11))
    plain = torch.randn(n, dim, generator=torch.Generator().manual_seed(12))
    f, r, p = _features(x, fast), _features(x, ref), _features(x, plain)
    for name in f:
        assert stats.ks_2samp(f[name].numpy(), r[name].numpy()).pvalue > 1e-3, name
    # The test has power: KNN noise is measurably closer and more aligned than plain noise.
    assert stats.ks_2samp(f["distance"].numpy(), p["distance"].numpy()).pvalue < 1e-6
    assert f["projection"].mean() > p["projection"].mean() + 0.1


def test_fast_sampler_handles_a_zero_sample():
    x0 = torch.zeros(2000, 16)
    noise, _, best = knn_noise(x0, 8, torch.Generator().manual_seed(0))
    assert torch.isfinite(noise).all()
    assert torch.allclose(noise.norm(dim=1), best, atol=1e-4)
    # Nearest-to-zero of 8 draws has less energy than a plain draw, and no preferred direction.
    assert noise.pow(2).sum(1).mean() < 16 * 0.9
    assert noise.mean(0).abs().max() < 0.15


def test_knn_stats_report_a_reduction_and_groups_change_nothing():
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    imm = ImmiscibleNoise("knn", k=8)
    plain = imm(x0, generator=torch.Generator().manual_seed(0))
    assert 0 < imm.last_stats.relative_reduction < 0.5
    assert imm.last_stats.mean_distance_after < imm.last_stats.mean_distance_before
    grouped = imm(x0, generator=torch.Generator().manual_seed(0), groups=torch.arange(64) % 3)
    assert torch.equal(plain, grouped)


def test_reference_sampler_is_selectable():
    x0 = torch.randn(8, 4)
    imm = ImmiscibleNoise("knn", k=3, knn_sampler="reference")
    expected, _, _ = knn_noise_reference(x0, 3, torch.Generator().manual_seed(2))
    assert torch.equal(imm(x0, generator=torch.Generator().manual_seed(2)), expected)
