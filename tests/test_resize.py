"""Tests of the embedding resize (convert/resize.py): plain arithmetic and linear algebra on generated embedding
matrices (``strategies.embed_specs``), never the converter's own formulas.

Found by these tests: ``resize`` seeded its generator with ``manual_seed(seed)`` and torch's CPU generator keeps only
the low 32 bits, so seeds s and s + 2**32 (and -1 and 2**32 - 1) silently gave the same rows and 2**64 raised a
bare ValueError; resize now refuses seeds outside [0, 2**32) (``test_seed_refused_or_its_own``).

Tiers: each property runs in the default run under the "ci" hypothesis profile (``test_x``) and again, marked
``slow``, under the "slow" profile with bigger matrices (``test_x_slow``): ``pytest -m slow tests/test_resize.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import EmbedSpec, embed_specs, slow_tier, smallest_multiple_of_64_at_least

from convert.config import padded_rows
from convert.errors import ConversionError
from convert.resize import SCALE, resize, sample_new_rows


@pytest.mark.parametrize("shape", [(10, 64), (997, 64), (50, 300)])
def test_resize_new_rows_statistics(shape):
    """Singular covariance (h > n) works; original rows kept; the new rows' mean distance matches 1e-5 tr(Sigma)."""
    g = torch.Generator().manual_seed(0)
    E = torch.randn(*shape, generator=g)
    r = resize(E, E.clone(), -(-(shape[0] + 2) // 64) * 64, 0, torch.float32)
    assert torch.equal(r.embed[: shape[0]], E) and r.rows % 64 == 0
    mu = E.double().mean(0)
    tr = ((E.double() - mu) ** 2).sum(1).mean()
    d = ((r.embed[shape[0] :].double() - mu) ** 2).sum(1) / (1e-5 * tr)
    assert 0.3 < d.mean().item() < 3.0


def _stats(e: torch.Tensor):
    """mu, tr(Sigma), tr(Sigma^2) of the rows, float64 (population covariance)."""
    x = e.to(torch.float64)
    mu = x.mean(0)
    c = x - mu
    sigma = c.T @ c / x.shape[0]
    return mu, torch.trace(sigma).item(), (sigma * sigma).sum().item()


_RESIZE_EXAMPLES = [
    EmbedSpec(n=3, h=64, rank=64, scale=0.5, offset=1.0, seed=0),  # h > n: singular
    EmbedSpec(n=1, h=16, rank=16, scale=1.0, offset=1.0, seed=1),  # one row: Sigma = 0
    EmbedSpec(n=997, h=64, rank=64, scale=0.02, offset=0.1, seed=2),
    EmbedSpec(n=2000, h=256, rank=8, scale=1.0, offset=0.0, seed=3),  # n > h but rank 8
    EmbedSpec(n=62, h=1, rank=1, scale=4.0, offset=1.0, seed=4),  # 62 + 2 = 64 rows exactly
    EmbedSpec(n=63, h=32, rank=32, scale=1e-3, offset=1.0, seed=5),  # 65 -> 128 rows, tiny spread
]


def _pin_resize(fn):
    for e in _RESIZE_EXAMPLES:
        fn = example(emb=e, dtype=torch.float32, seed=0)(fn)
    return example(emb=_RESIZE_EXAMPLES[2], dtype=torch.bfloat16, seed=7)(fn)


def _resize_keeps_rows_and_seeds(emb: EmbedSpec, dtype, seed: int):
    e = emb.build(dtype)
    head = EmbedSpec(emb.n, emb.h, emb.h, 1.0, 3.0, emb.seed + 1).build(dtype)  # its own, different mean
    rows = smallest_multiple_of_64_at_least(emb.n + 2)
    r = resize(e, head, padded_rows(emb.n), seed, dtype)
    assert (r.rows, r.original_rows) == (rows, emb.n)
    assert r.embed.shape == r.lm_head.shape == (rows, emb.h) and r.embed.dtype == r.lm_head.dtype == dtype
    # original rows bit for bit (compared as integers: no float equality subtleties)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    assert torch.equal(r.embed[: emb.n].view(bits), e.view(bits))
    assert torch.equal(r.lm_head[: emb.n].view(bits), head.view(bits))
    new = torch.cat([r.embed[emb.n :], r.lm_head[emb.n :]]).to(torch.float64)
    assert torch.isfinite(new).all()
    # both matrices' new rows come from the EMBEDDING statistics: each within a chi-square tail bound of mu.
    # ||x - mu||^2 / tr(C) for x ~ N(mu, C) has a tail no heavier than chi2(1) above 1.54 (Szekely-Bakirov);
    # P(chi2_1 > 50) ~ 2e-12; the output rounding adds at most eps * ||x||.
    mu, tr, _ = _stats(e)
    eps = torch.finfo(dtype).eps
    dist = (new - mu).norm(dim=1)
    bound = math.sqrt(50 * SCALE * tr) + eps * new.norm(dim=1) + 1e-12
    assert (dist <= bound).all(), f"a new row is {dist.max():.3g} from mu (bound {bound.min():.3g})"
    # the same seed gives the same bits; a different seed different rows (when Sigma != 0)
    again = resize(e, head, rows, seed, dtype)
    assert torch.equal(again.embed, r.embed) and torch.equal(again.lm_head, r.lm_head)
    other = resize(e, head, rows, seed + 1, dtype)
    assert torch.equal(other.embed[: emb.n], r.embed[: emb.n])
    if tr > 0 and dtype == torch.float32:
        assert not torch.equal(other.embed[emb.n :], r.embed[emb.n :])
        assert not torch.equal(other.lm_head[emb.n :], r.lm_head[emb.n :])


@given(
    emb=embed_specs(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
@_pin_resize
def test_resize_keeps_rows_and_seeds(emb: EmbedSpec, dtype, seed: int):
    _resize_keeps_rows_and_seeds(emb, dtype, seed)


@slow_tier
@given(
    emb=embed_specs(max_n=32000, max_h=512),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
@_pin_resize
def test_resize_keeps_rows_and_seeds_slow(emb: EmbedSpec, dtype, seed: int):
    _resize_keeps_rows_and_seeds(emb, dtype, seed)


def _pin_seeds(fn):
    """Pin the seeds at and beyond the 32-bit boundary, and negative ones."""
    for seed in (2**32, 2**32 - 1, 2**32 + 7, -1, 2**64 - 1, 2**64):
        fn = example(seed=seed)(fn)
    return fn


def _seed_refused_or_its_own(seed: int):
    """A seed either gives its own rows or is refused by name; never silently the rows of another seed.
    torch's CPU generator keeps the low 32 bits, so exactly the seeds in [0, 2**32) can be honoured."""
    e = _RESIZE_EXAMPLES[2].build(torch.float32)
    n, rows = e.shape[0], padded_rows(e.shape[0])
    try:
        r = resize(e, e.clone(), rows, seed, torch.float32)
    except ConversionError as err:
        assert str(seed) in str(err)
        assert not 0 <= seed < 2**32, f"seed {seed} refused"
        return
    assert 0 <= seed < 2**32, f"seed {seed} accepted, but it gives the rows of seed {seed % 2**32}"
    assert torch.equal(r.embed[n:], resize(e, e.clone(), rows, seed, torch.float32).embed[n:])


@given(seed=st.one_of(st.integers(-(2**70), 2**70), st.integers(-3, 2**32 + 3)))
@_pin_seeds
def test_seed_refused_or_its_own(seed: int):
    _seed_refused_or_its_own(seed)


@slow_tier
@given(seed=st.one_of(st.integers(-(2**70), 2**70), st.integers(-3, 2**32 + 3)))
@_pin_seeds
def test_seed_refused_or_its_own_slow(seed: int):
    _seed_refused_or_its_own(seed)


M = 1000  # new rows drawn for the statistics


def _new_rows_converge(emb: EmbedSpec, dtype, seed: int):
    """Mean of m new rows -> mu: x_bar - mu ~ N(0, 1e-5 Sigma / m), so ||x_bar - mu||^2 <= 25 * 1e-5 tr(Sigma) / m
    except with probability <= P(chi2_1 > 25) ~ 6e-7 (same tail bound as above). Scale: the mean of
    ||x - mu||^2 over m rows is 1e-5 tr(Sigma) with standard deviation 1e-5 sqrt(2 tr(Sigma^2) / m); 7 of them."""
    e = emb.build(dtype).to(torch.float32)
    mu, tr, tr2 = _stats(e)
    x = sample_new_rows(e, M, torch.Generator().manual_seed(seed))
    slack = 1e-10 * (1 + mu.norm().item())
    assert (x.mean(0) - mu).norm().item() <= 5 * math.sqrt(SCALE * tr / M) + slack
    msd = ((x - mu) ** 2).sum(1).mean().item()
    assert abs(msd - SCALE * tr) <= 7 * SCALE * math.sqrt(2 * tr2 / M) + slack


@given(emb=embed_specs(max_n=1500), dtype=st.just(torch.float32), seed=st.integers(0, 2**31 - 1))
@_pin_resize
def test_new_rows_converge(emb: EmbedSpec, dtype, seed: int):
    _new_rows_converge(emb, dtype, seed)


@slow_tier
@given(emb=embed_specs(max_n=8000, max_h=256), dtype=st.just(torch.float32), seed=st.integers(0, 2**31 - 1))
@_pin_resize
def test_new_rows_converge_slow(emb: EmbedSpec, dtype, seed: int):
    _new_rows_converge(emb, dtype, seed)


def _residual_off_span(x: torch.Tensor, e: torch.Tensor):
    """Norms of the rows of x - mu after removing their component in span(E - mu), and of x - mu."""
    mu = e.to(torch.float64).mean(0)
    c = e.to(torch.float64) - mu
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    rank = int((s > s.max() * 1e-9).sum()) if s.numel() and s.max() > 0 else 0
    q = vh[:rank]
    d = x.to(torch.float64) - mu
    return (d - d @ q.T @ q).norm(dim=1), d.norm(dim=1), rank


def _singular_covariance_stays_in_span(emb: EmbedSpec, dtype, seed: int):
    """Sigma singular (h > n - 1, or rank < h): no crash, new rows in mu + span(E - mu)."""
    e = emb.build(torch.float32)
    x = sample_new_rows(e, 64, torch.Generator().manual_seed(seed))
    res, dist, rank = _residual_off_span(x, e)
    assert rank <= min(emb.n - 1, emb.rank, emb.h)
    mu_norm = e.to(torch.float64).mean(0).norm().item()
    assert (res <= 1e-9 * dist + 1e-12 * (1 + mu_norm)).all(), f"off-span residual {res.max():.3g}"
    # through resize (float32 output): rounding moves a row by at most eps32 * ||x||
    r = resize(e, e.clone(), padded_rows(emb.n), seed, torch.float32)
    new = torch.cat([r.embed[emb.n :], r.lm_head[emb.n :]])
    res, dist, _ = _residual_off_span(new, e)
    assert (res <= torch.finfo(torch.float32).eps * new.to(torch.float64).norm(dim=1) + 1e-12).all()


@given(
    emb=embed_specs().filter(lambda m: m.h > m.n - 1 or m.rank < m.h),
    dtype=st.just(torch.float32),
    seed=st.integers(0, 2**31 - 1),
)
@_pin_resize
def test_singular_covariance_stays_in_span(emb: EmbedSpec, dtype, seed: int):
    _singular_covariance_stays_in_span(emb, dtype, seed)


@slow_tier
@given(
    emb=embed_specs(max_n=4000, max_h=384).filter(lambda m: m.h > m.n - 1 or m.rank < m.h),
    dtype=st.just(torch.float32),
    seed=st.integers(0, 2**31 - 1),
)
@_pin_resize
def test_singular_covariance_stays_in_span_slow(emb: EmbedSpec, dtype, seed: int):
    _singular_covariance_stays_in_span(emb, dtype, seed)
