"""Float32 arithmetic over weights stored in bfloat16, one block at a time.

A 7B model held in float32 needs 27 GB; held as stored (bf16, memory-mapped from its files) it needs no anonymous
memory at all, but bf16 matrix products run 7x slower than float32 ones on a CPU without bf16 units (measured on
the CI machine: 22 vs 161 GFLOPS for a 640 x 4096 x 11008 product). :class:`Float32Blocks` gets both: the model
keeps its bf16 parameters, and each *block* (a linear layer, a norm, the embedding ...) has its parameters
copied into float32 buffers just before its forward runs and put back right after it. Blocks run one after the
other, so the buffers of one block serve the next one of the same shapes: the float32 memory is one block of each
kind, about 3 GiB for a 7B pair of models, whatever the depth. A linear layer fed a few rows (up to ``FEW_ROWS``: a
prompt's tail after a shared prefix) skips the whole-weight copy and multiplies its weight slab by slab
(:func:`slab_linear`): there the copy, not the product, is what costs (measured on the CI machine, one 13B-shaped
layer over 20 rows: 302 ms with the weights copied whole, 173-182 ms by slabs).

The copies are exact (every bf16 value is a float32 value), so a forward under :class:`Float32Blocks` computes the
model's function in float32 arithmetic on its stored weights. Nothing here knows which model it runs; the
reference and the converted model use it alike, and it changes precision only, never what is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Disjoint modules that together hold every parameter of ``model``: the outermost modules on each path that own
    a parameter themselves (a Linear, a norm, an embedding; CLIP's embeddings module, which owns the class embedding,
    with its patch and position embeddings, since it casts its input to the patch embedding's dtype). Small blocks
    keep every entry point covered: a submodule called on its own (``generate`` runs the vision tower before the
    model's first forward) still computes in float32."""
    out: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        if any(True for _ in m.parameters(recurse=False)):
            out.append(m)
            return
        for c in m.children():
            visit(c)

    visit(model)
    return out


class Float32Blocks:
    """Context manager: while active (and while :attr:`enabled`), every block of the given models computes in
    float32 over its stored low-precision parameters. Parameters already in float32 are left alone.

    ``enabled`` may be switched off between forward calls (greedy steps after the prompt run in the stored dtype)."""

    def __init__(self, *models: torch.nn.Module):
        self.models = models
        self.enabled = True
        self._pool: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._active: torch.nn.Module | None = None
        self._handles: list[Any] = []
        self._slabbed: set[torch.nn.Module] = set()

    def _buffers(self, params: list[torch.nn.Parameter]) -> Iterator[torch.Tensor]:
        seen: dict[tuple[int, ...], int] = {}
        for p in params:
            shape = tuple(p.shape)
            n = seen.get(shape, 0)
            seen[shape] = n + 1
            pool = self._pool.setdefault(shape, [])
            if len(pool) <= n:
                pool.append(torch.empty(shape, dtype=torch.float32))
            yield pool[n]

    def _enter_block(self, block: torch.nn.Module, args: Any) -> None:
        if not self.enabled:
            return
        if self._active is not None:
            raise RuntimeError(
                f"Float32Blocks: block {type(block).__name__} entered inside {type(self._active).__name__}"
            )
        if block in self._slabbed and not torch.is_grad_enabled() and _few_rows(args):
            return  # its forward multiplies by slabs (``_linear``): nothing to copy
        params = [p for p in block.parameters() if p.is_floating_point() and p.dtype != torch.float32]
        for p, buf in zip(params, self._buffers(params), strict=True):
            buf.copy_(p.data)
            self._saved.append((p, p.data))
            p.data = buf
        self._active = block

    def _leave_block(self, block: torch.nn.Module, _args: Any, _out: Any) -> None:
        if self._active is not block:
            return
        for p, stored in self._saved:
            p.data = stored
        self._saved.clear()
        self._active = None

    def _linear(self, module: torch.nn.Linear):
        stored = torch.nn.Linear.forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            if self.enabled and weight.dtype != torch.float32 and not torch.is_grad_enabled():
                # left low-precision by ``_enter_block``: a few rows, by slabs
                return slab_linear(x, weight, module.bias, torch.float32)
            return stored(x)

        return forward

    def __enter__(self) -> "Float32Blocks":
        for model in self.models:
            for b in blocks(model):
                if type(b) is torch.nn.Linear and b.weight.dtype in (torch.bfloat16, torch.float16):
                    b.forward = self._linear(b)  # type: ignore[method-assign]
                    self._slabbed.add(b)
                self._handles.append(b.register_forward_pre_hook(self._enter_block))
                self._handles.append(b.register_forward_hook(self._leave_block, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._slabbed:
            del m.forward
        self._slabbed.clear()
        if self._active is not None:
            self._leave_block(self._active, None, None)
        self._pool.clear()

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * 4 for ts in self._pool.values() for t in ts)


SLAB_BYTES = 4 << 20  # float32 bytes of one weight slab (slab_linear): it stays in the cache while multiplied
FEW_ROWS = 64  # inputs of up to this many rows multiply by slabs (Float32Blocks, Float32Products)


def _few_rows(args: Any) -> bool:
    x = args[0] if args else None
    return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= FEW_ROWS


def slab_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows ``x`` and a low-precision ``weight``: float32 products and sums,
    the result rounded once to ``out_dtype``. The weight is upcast (exactly) one slab of output rows at a time,
    each slab multiplied while it is still in the core's cache, so nothing the size of the weight is written. One
    slab buffer serves every slab (a fresh one per slab would be a fresh mapping each time, past the heap's mmap
    threshold: ``return_large_buffers_to_the_system``)."""
    rows, width = weight.shape
    x2 = x.reshape(-1, width).to(torch.float32)
    out_t = torch.empty((rows, x2.shape[0]), dtype=torch.float32)
    step = min(rows, max(16, SLAB_BYTES // (4 * width)))
    slab = torch.empty((step, width), dtype=torch.float32)
    xt = x2.t()
    for r in range(0, rows, step):
        n = min(step, rows - r)
        slab[:n].copy_(weight[r : r + n])
        torch.mm(slab[:n], xt, out=out_t[r : r + n])
    if bias is not None:
        out_t += bias.to(torch.float32)[:, None]
    # row-major, as a linear layer's output is (attention kernels take a slower path on transposed strides)
    out = torch.empty((x2.shape[0], rows), dtype=out_dtype)
    out.copy_(out_t.t())
    return out.reshape(*x.shape[:-1], rows)


class Float32Products:
    """Context manager for the greedy steps: while active, every ``nn.Linear`` of the given models that holds a
    low-precision weight computes its product in float32 (:func:`slab_linear`) and returns the weight's dtype, so
    the rest of the model (caches, attention, norms) runs in the stored dtype as before.

    A step feeds a few rows per prompt batch, where a bf16 matrix product on a CPU without bf16 units is the slow
    part (measured on the CI machine, 9 x 4096 x 11008: 37 ms in bf16, 18 ms here). The values are those of a bf16
    product with float32 accumulation, the summation order aside. Model-agnostic: the reference and the converted
    model use it alike. Large inputs (more rows than ``max_rows``) and calls with autograd on take the stored path."""

    def __init__(self, *models: torch.nn.Module, max_rows: int = FEW_ROWS):
        self.models = models
        self.max_rows = max_rows
        self._patched: list[torch.nn.Linear] = []

    def _forward(self, module: torch.nn.Linear):
        stored = torch.nn.Linear.forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.numel() // x.shape[-1] > self.max_rows or torch.is_grad_enabled():
                return stored(x)
            return slab_linear(x, module.weight, module.bias, x.dtype)

        return forward

    def __enter__(self) -> "Float32Products":
        for model in self.models:
            for m in model.modules():
                if type(m) is torch.nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float16):
                    m.forward = self._forward(m)  # type: ignore[method-assign]
                    self._patched.append(m)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self._patched:
            del m.forward
        self._patched.clear()


def cast_cache(cache: Any, dtype: torch.dtype) -> Any:
    """Cast a transformers key/value cache's tensors to ``dtype`` in place (the greedy steps after a float32 prompt
    forward run in the stored dtype, and attention needs the cached keys in the query's dtype)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cannot cast a {type(cache).__name__} cache (no .layers)")
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
                setattr(layer, name, t.to(dtype))
        # a lazily initialised layer remembers its dtype
        if getattr(layer, "dtype", None) is not None and isinstance(layer.dtype, torch.dtype):
            layer.dtype = dtype
    return cache


def reserved_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], filled: int) -> Any:
    """A transformers ``DynamicCache`` whose layer ``j`` holds the first ``filled`` positions of ``pairs[j]`` (keys,
    values buffers ``[batch, heads, capacity, head_dim]``) and writes the positions that follow into the rest of the
    buffers, in place. A ``DynamicLayer`` concatenates instead: every greedy step copies the whole cache once more
    (2.7 GB per step for the 9 default prompts at 7B; 21 s of a 7B default verify, measured with py-spy). The keys
    and values a step attends over are the same numbers either way (a view of the first positions); past the
    capacity, or once something replaced a layer's tensors (``reorder_cache``, ``batch_select_indices``), the layer
    concatenates as ``DynamicLayer`` does."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[..., :filled, :], v[..., :filled, :]) for k, v in pairs])
    cache.layers = [_reserved_layer(k, v, filled) for k, v in pairs]
    return cache


def _reserved_layer(keys: torch.Tensor, values: torch.Tensor, filled: int) -> Any:
    layer = _reserved_layer_class()()
    layer.lazy_initialization(keys, values)
    layer._room = (keys, values)
    layer.keys, layer.values = keys[..., :filled, :], values[..., :filled, :]
    return layer


@functools.cache
def _reserved_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if self._holds_prefix(n) and n + m <= self._room[0].shape[-2]:
                kb, vb = self._room
                kb[..., n : n + m, :] = key_states
                vb[..., n : n + m, :] = value_states
                self.keys, self.values = kb[..., : n + m, :], vb[..., : n + m, :]
                return self.keys, self.values
            self._room = None
            return super().update(key_states, value_states, *args, **kwargs)

        def _holds_prefix(self, n: int) -> bool:
            """keys and values are still the views of the first ``n`` positions of the buffers."""
            if self._room is None:
                return False
            for t, b in zip((self.keys, self.values), self._room, strict=True):
                if (
                    t is None
                    or t.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                    or t.storage_offset() != b.storage_offset()
                    or t.stride() != b.stride()
                    or t.shape[:-2] != b.shape[:-2]
                    or t.shape[-1] != b.shape[-1]
                ):
                    return False
            return n <= self._room[0].shape[-2]

    return ReservedLayer


def output_cache(out: Any) -> Any:
    """The key/value cache a transformers forward returned (``cache`` in 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
HEAP_MMAP_THRESHOLD = 4 << 20


def return_large_buffers_to_the_system() -> bool:
    """glibc only: every allocation of 4 MiB or more gets its own mapping, unmapped when freed.

    A verify run keeps many key/value caches alive (a lock-step batch holds every prompt's) while larger transient
    buffers come and go around them (a float32 prompt forward's activations and cache). glibc's default raises its
    mmap threshold to the largest buffer freed (up to 32 MiB), after which such buffers come from the heap, where the
    long-lived caches pin the freed space between them: measured on a 7B default run, 9.4 GB of anonymous memory at
    the peak against 6.9 GiB estimated. A fixed threshold keeps the heap to small objects. Process-wide and
    idempotent; returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
