"""Weights by tensor name, produced one tensor at a time: what lets a model bigger than memory be exported.

A `WeightSource` knows every tensor of a model by its canonical name (shape and dtype) and produces one on
request: `RandomWeights` generates it from a seed derived from the name (so any tensor can be made alone,
in any order, and runs repeat), `CheckpointWeights` converts one memory-mapped safetensors tensor: in a lazy load
(an export) it copies the tensor out of the file's map and hands the map's pages of it back to the kernel
(`madvise`), so the pages an export has read do not stay in its resident set (a 1.2B fp32 checkpoint is 4.7 GB
of them); an eager load's weights are views into the map.

`lazy_model` builds the canonical model whose every parameter and buffer is a zero-stride view of one NaN
(4 bytes in all, whatever the model's size): `torch.export` traces it (shapes and dtypes are all it reads)
and a backend replaces each traced weight by the source's tensor as it writes it. A backend that forgot to
would write NaN weights, which parity reports as non-finite logits, never as plausible numbers.
`materialize` builds the ordinary model (real tensors) from a source, e.g. the fp32 reference for parity.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import weakref
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lfm_export.config import Lfm2Config
from lfm_export.model import Lfm2ForCausalLM, build_model

RANDOM_STD = 0.02
RANDOM_SCHEME = "per-tensor normal(0, 0.02), seed crc32('<seed>:<name>'); norms 1, vectors 0"
"""Recorded in manifests of random models: the generator that made the weights (changes if it changes)."""

_LAZY: weakref.WeakKeyDictionary[nn.Module, WeightSource] = weakref.WeakKeyDictionary()


def float_dtype_for(name: str, dtype: torch.dtype) -> torch.dtype:
    """The MoE `expert_bias` stays float32 whatever the model's dtype (it only ranks experts)."""
    return torch.float32 if name.endswith("expert_bias") else dtype


class WeightSource(ABC):
    """Every tensor of one model by canonical name (`model.state_dict()` names, tied `lm_head.weight` included)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, tied: bool) -> None:
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}

    def names(self) -> list[str]:
        return [n for n in self.shapes if n not in self.aliases]

    def nbytes(self) -> int:
        """Bytes of every distinct tensor at the model's dtype (a tied table counted once)."""
        total = 0
        for name in self.names():
            numel = 1
            for d in self.shapes[name]:
                numel *= d
            total += numel * torch.tensor([], dtype=float_dtype_for(name, self.dtype)).element_size()
        return total

    def get(self, name: str) -> Tensor:
        """The tensor `name` at the model's dtype (float32 for `expert_bias`); a new tensor or a read-only view."""
        name = self.aliases.get(name, name)
        if name not in self.shapes:
            raise KeyError(name)
        return self._make(name, float_dtype_for(name, self.dtype))

    @abstractmethod
    def _make(self, name: str, dtype: torch.dtype) -> Tensor: ...


def model_shapes(cfg: Lfm2Config) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes of the architecture (no memory: built on the meta device)."""
    return {n: tuple(t.shape) for n, t in build_model(cfg).state_dict(keep_vars=True).items()}


def random_seed(name: str, seed: int) -> int:
    """Stable across processes and Python versions (unlike `hash`)."""
    return zlib.crc32(f"{seed}:{name}".encode())


class RandomWeights(WeightSource):
    """`RANDOM_SCHEME`: matrices and conv kernels normal(0, 0.02), norm weights 1, other vectors 0."""

    def __init__(self, cfg: Lfm2Config, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__(model_shapes(cfg), dtype, cfg.tie_word_embeddings)
        self.seed = seed

    def _make(self, name: str, dtype: torch.dtype) -> Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if len(shape) < 2:
            return torch.zeros(shape, dtype=dtype)
        gen = torch.Generator().manual_seed(random_seed(name, self.seed))
        return torch.empty(shape, dtype=dtype).normal_(0.0, RANDOM_STD, generator=gen)


_MADV_DONTNEED = 4
"""`MADV_DONTNEED` on Linux and macOS: a private file map's unwritten pages are dropped and read again from
the file on the next access."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def release_pages(t: Tensor) -> bool:
    """Hand the memory pages under `t` back to the kernel (`madvise(MADV_DONTNEED)`, widened to whole pages).
    Only for a view into a read-only private file map (`loading.mmap_safetensors`): on any other memory it
    would discard data. False where the platform has no `madvise`."""
    if _LIBC is None or t.numel() == 0:
        return False
    page = mmap.PAGESIZE
    begin = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
    return _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), _MADV_DONTNEED) == 0


class CheckpointWeights(WeightSource):
    """Checkpoint tensors (canonical names, checked against the architecture) converted to the model's dtype
    on request: a bf16 checkpoint is never held whole in float32. A tensor that is a view into one of `maps`
    (the safetensors files' private memory maps, held here so their addresses stay theirs) is copied out and
    its pages released (`release_pages`): reading every weight once leaves none of the file resident."""

    def __init__(
        self,
        cfg: Lfm2Config,
        tensors: Mapping[str, Tensor],
        dtype: torch.dtype,
        maps: Sequence[torch.UntypedStorage] = (),
    ) -> None:
        super().__init__({n: tuple(t.shape) for n, t in tensors.items()}, dtype, cfg.tie_word_embeddings)
        self.tensors = dict(tensors)
        self.maps = list(maps)
        self._ranges = [(m.data_ptr(), m.data_ptr() + m.nbytes()) for m in self.maps]
        if cfg.tie_word_embeddings:
            self.shapes["lm_head.weight"] = self.shapes["model.embed_tokens.weight"]

    def _mapped(self, t: Tensor) -> bool:
        p = t.data_ptr()
        return any(lo <= p < hi for lo, hi in self._ranges)

    def _make(self, name: str, dtype: torch.dtype) -> Tensor:
        t = self.tensors[name]
        if not self._mapped(t):
            return t if t.dtype == dtype else t.to(dtype)
        out = t.to(dtype, copy=True)
        release_pages(t)
        return out


def lazy_model(cfg: Lfm2Config, source: WeightSource) -> Lfm2ForCausalLM:
    """The canonical model with NaN zero-stride views for weights (traceable, 4 bytes); `lazy_source` gives
    `source` back for it."""
    model = build_model(cfg)
    nan: dict[torch.dtype, Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, p in list(module.named_parameters(recurse=False)):
            dtype = float_dtype_for(prefix + attr, source.dtype)
            view = nan.setdefault(dtype, torch.full((), float("nan"), dtype=dtype)).expand(p.shape)
            setattr(module, attr, nn.Parameter(view, requires_grad=False))
        for attr, b in list(module.named_buffers(recurse=False)):
            dtype = float_dtype_for(prefix + attr, source.dtype)
            module._buffers[attr] = nan.setdefault(dtype, torch.full((), float("nan"), dtype=dtype)).expand(
                b.shape
            )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _LAZY[model] = source
    return model.eval()


def lazy_source(model: nn.Module) -> WeightSource | None:
    """The source of a `lazy_model` (None for a model holding real weights)."""
    return _LAZY.get(model)


def materialize(cfg: Lfm2Config, source: WeightSource) -> Lfm2ForCausalLM:
    """The canonical model with real tensors from `source` (views where the source holds the right dtype)."""
    model = build_model(cfg)
    state = {name: source.get(name) for name in source.names()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def weights_of(model: Lfm2ForCausalLM) -> WeightSource:
    """A source over a model that holds its weights in memory (views, nothing copied): what streams an
    in-memory model one layer at a time like a lazy one."""
    return CheckpointWeights(model.config, model.state_dict(), torch.float32)
