"""Embedding resize: pad ``embed_tokens`` and ``lm_head`` to the padded row count with rows ~ N(mu, scale*Sigma).

mu and Sigma are the mean and (population) covariance of the ORIGINAL embedding rows E (n x h). Sigma is never
formed: with g ~ N(0, I_n), ``mu + sqrt(scale / n) * (E - mu)^T g`` has exactly covariance
``scale/n * (E - mu)^T (E - mu) = scale * Sigma``, also when Sigma is singular (h > n). Statistics and sampling
run in float64 over row chunks (bounded memory, and the same bits whatever the thread count after rounding to
the output dtype); all new rows of both matrices come from one seeded generator in one batch each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConversionError
from .preflight import SEED_LIMIT, check_seed  # noqa: F401 (re-exported)

SCALE = 1e-5
_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class ResizeResult:
    embed: torch.Tensor  # rows x h, dtype of the output
    lm_head: torch.Tensor
    original_rows: int
    rows: int
    seed: int

    @property
    def added(self) -> int:
        return self.rows - self.original_rows


def _chunks(n: int, size: int = _CHUNK_ROWS):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def embedding_mean(embed: torch.Tensor) -> torch.Tensor:
    """Mean of the rows in float64, computed chunk by chunk (the source may be a memory map)."""
    n, h = embed.shape
    total = torch.zeros(h, dtype=torch.float64)
    for a, b in _chunks(n):
        total += embed[a:b].to(torch.float64).sum(0)
    return total / n


def sample_new_rows(embed: torch.Tensor, count: int, generator: torch.Generator, scale: float = SCALE) -> torch.Tensor:
    """``count`` rows ~ N(mu, scale * Sigma) of ``embed``'s rows, float64, never forming Sigma."""
    n, h = embed.shape
    mu = embedding_mean(embed)
    g = torch.randn(count, n, generator=generator, dtype=torch.float64)
    acc = torch.zeros(count, h, dtype=torch.float64)
    for a, b in _chunks(n):
        acc += g[:, a:b] @ (embed[a:b].to(torch.float64) - mu)
    return mu + math.sqrt(scale / n) * acc


def check_finite(name: str, t: torch.Tensor) -> None:
    for a, b in _chunks(t.shape[0]):
        block = t[a:b]
        if not torch.isfinite(block).all():
            bad = (~torch.isfinite(block)).nonzero()[0].tolist()
            raise ConversionError(
                f"{name}: holds NaN or Inf (first at row {a + bad[0]}, column {bad[1]}); the checkpoint is "
                "damaged, re-download it"
            )


def _check_cast(name: str, t: torch.Tensor) -> None:
    """The matrix after a cast to a narrower dtype (its input was finite): an Inf here was a finite value before."""
    for a, b in _chunks(t.shape[0]):
        block = t[a:b]
        if torch.isinf(block).any():
            bad = torch.isinf(block).nonzero()[0].tolist()
            raise ConversionError(
                f"{name}: a value at row {a + bad[0]}, column {bad[1]} is beyond the range of "
                f"{str(t.dtype).removeprefix('torch.')} and would become Inf; pass --dtype auto, bfloat16 or float32"
            )


def resize(
    embed: torch.Tensor,
    lm_head: torch.Tensor,
    rows: int,
    seed: int,
    out_dtype: torch.dtype,
    scale: float = SCALE,
    head_dtype: torch.dtype | None = None,
) -> ResizeResult:
    """Both matrices padded to ``rows``; original rows copied bit for bit (then cast to ``out_dtype``; the
    lm_head to ``head_dtype`` when given, so a head stored in another dtype keeps it). A cast that would turn a
    finite value into Inf is refused."""
    head_dtype = head_dtype or out_dtype
    n, h = embed.shape
    if lm_head.shape != embed.shape:
        raise ConversionError(
            f"lm_head.weight has shape {tuple(lm_head.shape)} but embed_tokens has {tuple(embed.shape)}"
        )
    if rows < n:
        raise ConversionError(f"cannot resize {n} embedding rows down to {rows}")
    check_seed(seed)
    check_finite("model.embed_tokens.weight", embed)
    check_finite("lm_head.weight", lm_head)
    gen = torch.Generator().manual_seed(seed)
    k = rows - n
    # one batch for both matrices; the recipe draws the lm_head rows from the EMBEDDING statistics too
    new = sample_new_rows(embed, 2 * k, gen, scale)
    new_embed, new_head = new[:k], new[k:]
    out_e = torch.empty(rows, h, dtype=out_dtype)
    out_h = torch.empty(rows, h, dtype=head_dtype)
    out_e[:n] = embed.to(out_dtype)
    out_h[:n] = lm_head.to(head_dtype)
    out_e[n:] = new_embed.to(torch.float32).to(out_dtype)
    out_h[n:] = new_head.to(torch.float32).to(head_dtype)
    for name, t in (("model.embed_tokens.weight", out_e), ("lm_head.weight", out_h)):
        if t.dtype != (embed.dtype if t is out_e else lm_head.dtype):
            _check_cast(name, t)
    return ResizeResult(embed=out_e, lm_head=out_h, original_rows=n, rows=rows, seed=seed)
