"""Load an LFM2 checkpoint: a Hugging Face folder, a bundled model (`tiny`, `tiny-moe`) or `random:PRESET`.

Safetensors files are memory-mapped and their tensors are views into the map, so an fp32 checkpoint is never
copied; bf16/fp16 weights are converted tensor by tensor. Loading is strict: a missing, unexpected or
mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import CheckpointError, ConfigError, UnsupportedError, UserError
from lfm_export.model import Lfm2ForCausalLM
from lfm_export.weights import (
    RANDOM_SCHEME,
    CheckpointWeights,
    RandomWeights,
    WeightSource,
    lazy_model,
    materialize,
    model_shapes,
)

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {"tiny": ASSETS / "tiny", "tiny-moe": ASSETS / "tiny-moe"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


@dataclass
class LoadedModel:
    """A canonical model with everything known about where it came from."""

    model: Lfm2ForCausalLM
    config: Lfm2Config
    source: str
    path: Path | None
    random: bool
    weights_dtype: str
    generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    weights: WeightSource | None = None
    """Set when the model is lazy: `model` holds NaN placeholders and this produces each tensor on request."""
    hub: dict[str, Any] | None = None
    """Where a Hugging Face id came from: repo_id, revision and the commit it resolved to (`lfm_export.hub`)."""
    _identity: dict[str, Any] | None = None

    @property
    def lazy(self) -> bool:
        return self.weights is not None

    def reference_fits(self, copies: int = 2) -> bool:
        """Whether `copies` float32 copies of the model fit in memory (`fits_in_memory`): parity holds the fp32
        reference and the recipe's simulation (quantized linears dequantized to fp32), and where the runtime
        rounds activations the simulation without it; otherwise it streams them one layer at a time
        (`lfm_export.parity.streaming`)."""
        from lfm_export.presets import param_count

        return fits_in_memory(copies * 4 * param_count(self.config))

    def materialized(self) -> LoadedModel:
        """This model with real float tensors (itself when it is not lazy)."""
        if self.weights is None:
            return self
        require_memory(self.weights.nbytes(), f"{self.source} weights in {self.weights.dtype}")
        return dataclasses.replace(self, model=materialize(self.config, self.weights), weights=None)

    @property
    def name(self) -> str:
        if self.hub is not None:
            return self.source.split("/")[-1]
        return self.source if self.path is None or self.source in BUNDLED else self.path.name

    @property
    def tokenizer_file(self) -> Path | None:
        if self.path is None:
            return None
        f = self.path / "tokenizer.json"
        return f if f.is_file() else None

    def tokenizer_files(self) -> list[Path]:
        """Files a runtime needs beside the model to tokenize and template (copied into artifacts)."""
        if self.path is None:
            return []
        names = TOKENIZER_FILES + ("generation_config.json",)
        return [self.path / n for n in names if (self.path / n).is_file()]

    def copy_tokenizer_files(self, folder: Path) -> None:
        """Copy `tokenizer_files()` into an artifact folder (the pipeline does, after the backend's export)."""
        for f in self.tokenizer_files():
            shutil.copy2(f, Path(folder) / f.name)

    def identity(self) -> dict[str, Any]:
        """Model identity for manifests: source, random or not, sha256 of config and weights."""
        if self._identity is None:
            cfg_bytes = json.dumps(self.config.to_dict(), sort_keys=True).encode()
            ident: dict[str, Any] = {
                "source": self.source,
                "name": self.name,
                "random_weights": self.random,
                "model_type": self.config.model_type,
                "weights_dtype": self.weights_dtype,
                "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
            }
            if self.weight_files:
                h = hashlib.sha256()
                for f in self.weight_files:
                    h.update(file_sha256(f).encode())
                ident["weights_sha256"] = h.hexdigest()
            else:
                ident["weights_sha256"] = None
                ident["random_seed"] = 0
                ident["random_init"] = RANDOM_SCHEME
            if self.hub is not None:
                ident["hub"] = dict(self.hub)
            self._identity = ident
        return self._identity


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- safetensors, memory-mapped -----------------------------------------------------------------
def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor table, data offset). Validates that every tensor lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name}: not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a valid safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype}")
        if end > data_len or begin > end:
            raise CheckpointError(
                f"{path.name}: truncated or corrupt, tensor {name!r} lies past the end of the file"
            )
    return header, 8 + n


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file as views into a private memory map of it (no copy)."""
    header, offset = read_safetensors_header(path)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, offset + begin, (end - begin,))
        t = flat.view(dtype)
        shape = tuple(info["shape"])
        if t.numel() != int(torch.tensor(shape).prod().item() if shape else 1):
            raise CheckpointError(f"{path.name}: tensor {name!r} size does not match its shape {list(shape)}")
        out[name] = t.view(shape)
    return out


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{folder}: no model.safetensors (or index) found")


# ---- checkpoint name table --------------------------------------------------------------------------
def _unfuse_experts(name: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """transformers >= 5 may hold experts fused: `experts.gate_up_proj [E, 2F, H]`, `experts.down_proj [E, H, F]`."""
    for suffix in (".experts.gate_up_proj", ".experts.down_proj"):
        if name.endswith(suffix):
            prefix = name[: -len(suffix)] + ".experts"
            for e in range(t.shape[0]):
                if suffix.endswith("gate_up_proj"):
                    w1, w3 = t[e].chunk(2, dim=0)
                    out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w1, w3
                else:
                    out[f"{prefix}.{e}.w2.weight"] = t[e]
            return True
    return False


def canonical_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map checkpoint names to canonical ones (they are the same except for fused experts)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not _unfuse_experts(name, t, out):
            out[name] = t
    return out


def check_tensors(cfg: Lfm2Config, tensors: dict[str, torch.Tensor]) -> None:
    """Strict: every tensor the architecture has, no other, each with its shape and a float dtype (named).
    A tied `lm_head.weight` in the file is dropped from `tensors`."""
    expected = model_shapes(cfg)
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"checkpoint is missing tensor {missing[0]}{more}; does config.json match the weights?"
        )
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(
            f"checkpoint has unexpected tensor {unexpected[0]}{more}; does config.json match the weights?"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(t.shape)}, config.json implies {list(shape)}"
            )
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name} is {str(t.dtype).removeprefix('torch.')}; a float weight is expected there"
            )


# ---- sources ---------------------------------------------------------------------------------------------
def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, lazy: bool = False, revision: str | None = None
) -> LoadedModel:
    """Load a model from a folder, a bundled name (`tiny`, `tiny-moe`), `random:PRESET` or a Hugging Face id
    (`org/name` at `revision`, through the Hub's cache: `lfm_export.hub`).

    `lazy`: the model's weights are NaN placeholders and `loaded.weights` produces each tensor on request
    (see `lfm_export.weights`); exporters use that to write a model bigger than memory. `materialized()` gives
    the model with real tensors."""
    src = str(source)
    if src.startswith("random:"):
        return random_model(src.split(":", 1)[1], dtype, lazy=lazy)
    folder = BUNDLED.get(src, Path(src))
    hub = None
    if not folder.exists() and src not in BUNDLED:
        from lfm_export.hub import fetch, is_hub_id

        if is_hub_id(src):
            fetched = fetch(src, revision)
            folder, hub = fetched.folder, fetched.record()
    if not folder.exists():
        raise UserError(
            f"model {src!r} not found: not a folder, a bundled model (tiny, tiny-moe), random:PRESET or a "
            "Hugging Face id (org/name)"
        )
    if not folder.is_dir():
        raise UserError(f"model {src!r} is not a folder")
    cfg = Lfm2Config.from_file(folder / "config.json")
    check_tokenizer(folder)
    files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    maps: list[torch.UntypedStorage] = []
    for f in files:
        shard = mmap_safetensors(f)
        maps.extend(t.untyped_storage() for t in list(shard.values())[:1])
        for name, t in shard.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in more than one shard")
            tensors[name] = t
    weights_dtype = _dominant_dtype(tensors)
    tensors = canonical_state_dict(tensors)
    check_tensors(cfg, tensors)
    # lazy (an export): each tensor copied out and its pages released; eager: the model's weights are the map
    weights = CheckpointWeights(cfg, tensors, dtype, maps if lazy else ())
    return LoadedModel(
        model=lazy_model(cfg, weights) if lazy else materialize(cfg, weights),
        config=cfg,
        source=src,
        path=folder,
        random=False,
        weights_dtype=weights_dtype,
        generation_config=_read_json(folder / "generation_config.json"),
        chat_template=read_chat_template(folder),
        weight_files=files,
        weights=weights if lazy else None,
        hub=hub,
    )


def random_model(
    preset_name: str, dtype: torch.dtype = torch.float32, seed: int = 0, lazy: bool = False
) -> LoadedModel:
    """Real architecture, random weights (`RandomWeights`, seeded per tensor): for size and speed work. Always
    marked random. Eager, it refuses a model whose weights do not fit in memory; lazy, it holds none."""
    from lfm_export.presets import get_preset

    preset = get_preset(preset_name)
    cfg = preset.config
    weights = RandomWeights(cfg, dtype, seed)
    if not lazy:
        require_memory(weights.nbytes(), f"random:{preset.name} weights in {dtype}")
    return LoadedModel(
        model=lazy_model(cfg, weights) if lazy else materialize(cfg, weights),
        config=cfg,
        source=f"random:{preset.name}",
        path=None,
        random=True,
        weights_dtype=str(dtype).removeprefix("torch."),
        weights=weights if lazy else None,
    )


def fits_in_memory(nbytes: int) -> bool:
    """`nbytes` of tensors take at most 90% of the memory available now."""
    import psutil

    return nbytes <= 0.9 * psutil.virtual_memory().available


def require_memory(nbytes: int, what: str, hint: str = "") -> None:
    """Refuse (UnsupportedError) to build `nbytes` of tensors when they exceed 90% of available memory."""
    import psutil

    avail = psutil.virtual_memory().available
    if not fits_in_memory(nbytes):
        raise UnsupportedError(
            f"{what} need {nbytes / 1e9:.1f} GB, only {avail / 1e9:.1f} GB of memory is available{hint}"
        )


def init_random(cfg: Lfm2Config, dtype: torch.dtype = torch.float32, seed: int = 0) -> Lfm2ForCausalLM:
    """A model with `RandomWeights` (trainable parameters: the training script starts from it)."""
    model = materialize(cfg, RandomWeights(cfg, dtype, seed))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_checkpoint(
    model: Lfm2ForCausalLM,
    folder: Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `config.json` + safetensors in the Hugging Face layout (tied lm_head left out)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        state[k] = (v if k.endswith("expert_bias") else v.to(dtype)).contiguous()
    if max_shard_bytes is None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n"
    )


def check_tokenizer(folder: Path) -> None:
    """Refuse a `tokenizer.json` that `tokenizers` cannot load, before any export work (it is copied into every
    artifact, and parity and the runtime shims tokenize with it). A folder without one is fine."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    try:
        json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own untyped Exception
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: tokenizers cannot load it ({reason})") from None


def read_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tmpl = _read_json(folder / "tokenizer_config.json").get("chat_template")
    return tmpl if isinstance(tmpl, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _dominant_dtype(tensors: dict[str, torch.Tensor]) -> str:
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.__getitem__)).removeprefix("torch.") if counts else "unknown"
