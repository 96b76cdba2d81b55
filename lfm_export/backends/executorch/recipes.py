"""ExecuTorch recipes: a core `lfm_export.recipes.Recipe` plus the ExecuTorch knobs `max_prefill` and
`delegate`.

Supported: `fp32`, `int4-bN-a8` (`8da4w` = `int4-b128-a8`; `--group-size` picks N) and `int8-pc-a8` (`8da8w`:
int8 weights per output channel, `--group-size 0` in ExecuTorch's own terms), which XNNPACK runs with int8
activations (torchao's 8da4w / 8da8w forms, per-token asymmetric int8 activations: `lfm_export.quant`'s
`int8-token`). A quantized recipe holds the lm_head at int8 per output channel with int8 activations (XNNPACK's
`qd8-f32-qc8w` linear: `head_bits` 8) and the embedding table weight-only at `--embedding-quant` 8 (per row,
the default) or 4 (blocks of N), or float (`none`). `-mse` searches each block's scale (`quantize.py`) for every
weight the recipe quantizes.

`fp16`: every weight and the held state in float16 and the whole model computed in it (`half.py`), on XNNPACK's
fp16 kernels (ARM phones have fp16 arithmetic; XNNPACK's x86 fp16 GEMMs convert with F16C and accumulate in
fp32: on this VM `tiny` fp16 and fp32 bench alike). Judged against the canonical model run in fp16 by torch
(activation mode `native`, the `fp16-native` gate, as MLX's fp16): on `tiny` the `.pte` is 1.5e-3
from it (worst logit max rel; pooled median 3.6e-4, limit 1.5e-3) and an artifact of other weights (layer 0's
w2 x1.05) 7.6e-3 (median). Core ML's gate (`fp16-fp16`: fp32 compute, fp16-rounded linear inputs) is not
used: on `tiny-moe` that simulation is 8.0e-2 from the `.pte`, against 9.6e-4 for torch in fp16, and its MoE
form passed the other-weights artifact (README).

Refused with a pointer: bf16 (not built: XNNPACK's fp16 kernels are the mobile fast path; not measured);
fp16 with `--delegate portable` (not measured); weight-only int4 / int8 (XNNPACK's quantized linears take
int8 activations: use `-a8`); `-asym` (XNNPACK's int4 / int8 linears hold no zero point); `int8-bN-a8`: ExecuTorch 1.5.1's XNNPACK partitioner lowers int8 weights only
per output channel, not in blocks ("Only 4b group quantization is supported", measured), so int8 is `int8-pc-a8`;
with it, `--head-bits 4` and `--embedding-quant 4` (they take the recipe's block); `--delegate portable` with a quantized recipe (its linears are XNNPACK's
kernels). The QNN delegate is its own backend, `executorch-qnn` (`lfm_export.backends.executorch_qnn`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from lfm_export.contract.errors import UnsupportedError, UserError
from lfm_export.recipes import (
    ACT_FLOAT,
    ACT_INT8_TOKEN,
    ACT_NATIVE,
    HEAD_CHOICES,
    PER_CHANNEL,
    Recipe,
    parse_recipe,
    with_tables,
)

XNNPACK = "xnnpack"
DELEGATES = (XNNPACK, "portable")

DEFAULT_MAX_PREFILL = 128
"""Tokens one `forward` call takes at most (the runtime shim and ExecuTorch's runner chunk longer prompts).
Activations are planned for this many tokens, so it bounds the program's working memory (logits alone are
`max_prefill x vocab x 4` bytes)."""


@dataclass(frozen=True)
class ExecuTorchRecipe:
    """What an ExecuTorch export produces: the core `recipe` and `max_prefill` (None: `DEFAULT_MAX_PREFILL`,
    at most the context)."""

    recipe: Recipe = field(default_factory=Recipe)
    max_prefill: int | None = None
    delegate: str = XNNPACK

    def __post_init__(self) -> None:
        r = self.recipe
        if self.delegate not in DELEGATES:
            raise UnsupportedError(f"--delegate {self.delegate!r} is unknown; expected xnnpack or portable")
        if r.quantized and self.delegate != XNNPACK:
            raise UnsupportedError(
                f"{r.name}: quantized linears run on XNNPACK's kernels; use --delegate xnnpack or --quant fp32"
            )
        if r.dtype == "bf16":
            raise UnsupportedError(
                f"{r.name}: the ExecuTorch backend has no bf16 export (XNNPACK's half-precision fast path is "
                "fp16); use --quant fp16"
            )
        if r.dtype != "fp32" and (r.quantized or r.dtype != "fp16"):
            raise UnsupportedError(
                f"{r.name}: the ExecuTorch backend exports fp32, fp16 or int4/int8 -a8 recipes"
            )
        if r.dtype == "fp16" and self.delegate != XNNPACK:
            raise UnsupportedError(
                f"{r.name}: fp16 is lowered for XNNPACK's fp16 kernels; use --delegate xnnpack"
            )
        if r.quantized:
            if r.bits == 8 and not r.per_channel and not r.mix:
                raise UnsupportedError(
                    f"{r.name}: ExecuTorch's XNNPACK lowers int8 weights per channel only, not in blocks; "
                    "use int8-pc-a8 (8da8w, --group-size 0) or int4-b128-a8 (8da4w)"
                )
            if r.per_channel and (r.head_bits == 4 or r.embedding_bits == 4):
                raise UnsupportedError(
                    f"{r.name}: --head-bits 4 and --embedding-quant 4 quantize in blocks of the group size; "
                    "a per-channel recipe has none (use 8 or an int4-bN-a8 recipe)"
                )
            if r.activations != "int8":
                raise UnsupportedError(
                    f"{r.name}: XNNPACK's quantized linears take int8 activations; use "
                    f"{r.with_options(activations='int8').name} (alias 8da{r.bits}w for block 32)"
                )
            if not r.symmetric:
                raise UnsupportedError(
                    f"{r.name}: the ExecuTorch backend quantizes symmetric weights (XNNPACK's int4 and int8 "
                    "linears hold no zero point); drop -asym"
                )
            if r.rounding == "fit":
                raise UnsupportedError(
                    f"{r.name}: -fit is not supported by the ExecuTorch backend (XNNPACK holds bf16 scales it "
                    "rounds its own way); use -mse"
                )
        if r.head_bits not in (HEAD_CHOICES if r.quantized else (None,)):
            raise UnsupportedError(
                f"{r.name}: --head-bits takes 4 (blocks of the group size) or 8 (per channel), with a "
                "quantized recipe (fp32 keeps the lm_head float)"
            )
        if r.embedding_bits not in ((None, 8, 4) if r.quantized else (None,)):
            raise UnsupportedError(
                f"{r.name}: --embedding-quant takes 8, 4 or none, with a quantized recipe (fp32 keeps it float)"
            )
        if self.max_prefill is not None and self.max_prefill < 1:
            raise UnsupportedError(f"--max-prefill must be positive, got {self.max_prefill}")

    @classmethod
    def coerce(cls, recipe: ExecuTorchRecipe | Recipe | str) -> ExecuTorchRecipe:
        if isinstance(recipe, ExecuTorchRecipe):
            return recipe
        if isinstance(recipe, str):
            recipe = parse_recipe(recipe)
        return cls(with_tables(recipe))

    # ---- what a precision mix may hold, and its bytes as written (`lfm_export.budget`) ----------------------
    mix_candidates: ClassVar[tuple[tuple[int, int], ...]] = ((4, 32), (4, 64), (4, 128), (8, PER_CHANNEL))
    """What a group of a `--budget` mix may take: the linears XNNPACK runs with dynamic int8 activations, int4 in
    blocks (`qb4w`) and int8 per output channel (`qc8w`; ExecuTorch 1.5.1's partitioner lowers no int8 in
    blocks); the embedding table takes the same (`embedding.QuantizedEmbedding`)."""

    def quantized_bytes(
        self, shape: tuple[int, ...], bits: int, block: int, symmetric: bool, tied_table: bool
    ) -> int:
        """Bytes of a quantized `[rows, K]` weight in the `.pte`: a linear's int4 codes two a byte with a
        bfloat16 scale per block (XNNPACK's `qb4w`), int8 codes with a float32 scale per row (`qc8w`); the
        embedding table (`embedding.QuantizedEmbedding`) the same codes with float32 scales. A tied table
        (`tied_table`) is held twice: the lookup table and the lm_head."""
        rows, k = int(np.prod(shape[:-1])), int(shape[-1])
        per_row = k if bits == 8 else block or k

        def held(scale_bytes: int) -> int:
            return rows * k * bits // 8 + rows * (k // per_row) * scale_bytes

        linear = held(2 if bits == 4 else 4)
        return linear + held(4) if tied_table else linear

    # ---- what the pipeline reads ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def activations(self) -> str:
        """`int8-token` for `-a8` recipes (torchao / XNNPACK dynamic per-token int8), `native` for fp16 (the whole
        model computes in fp16: module doc), else `float`."""
        if self.recipe.dtype == "fp16":
            return ACT_NATIVE
        return ACT_INT8_TOKEN if self.recipe.quantized else ACT_FLOAT

    @property
    def simulated(self) -> Recipe:
        """The core recipe whose weights the artifact holds (the same as `recipe`: its head and embedding
        fields already say what the export did)."""
        return self.recipe

    def check_context(self, cfg: Any) -> None:
        """`--max-prefill` above the context this model gets (`--max-seq-len` or the model's) is refused."""
        context = self.recipe.context(cfg)
        if self.max_prefill is not None and self.max_prefill > context:
            raise UserError(
                f"--max-prefill {self.max_prefill} is above the context (--max-seq-len) {context}"
            )

    def prefill_for(self, context: int) -> int:
        return min(self.max_prefill or DEFAULT_MAX_PREFILL, context)

    def with_recipe(self, **changes: Any) -> ExecuTorchRecipe:
        return replace(self, recipe=self.recipe.with_options(**changes))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.recipe.to_dict(),
            "max_prefill": self.max_prefill,
            "delegate": self.delegate,
            "attention": "llama::custom_sdpa + llama::update_cache (KV seq-first)",
            "activation_rounding": self.activations,
            "weight_values": (
                "xnnpack-int4 (torchao symmetric, bf16 scales) / xnnpack-int8 per the mix"
                if self.recipe.mix
                else "xnnpack-int4 (torchao symmetric, bf16 scales)"
                if self.recipe.bits == 4
                else "xnnpack-int8 (torchao symmetric per channel, fp32 scales)"
            )
            if self.recipe.quantized
            else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExecuTorchRecipe:
        return cls(Recipe.from_dict(d), d.get("max_prefill"), d.get("delegate", XNNPACK))


def make_recipe(
    quant: str = "fp32",
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    group_size: int | None = None,
    embedding_quant: str | None = None,
    delegate: str = XNNPACK,
    head_bits: int | None = None,
) -> Any:
    """The recipe `lfm-export executorch --quant Q [--group-size N] [--embedding-quant 8|4|none]
    [--head-bits 4|8] [--max-seq-len N] [--max-prefill N] [--delegate D]` builds (`group_size` /
    `embedding_quant` / `head_bits` None: the name's block size, an int8 table and an int8 head for quantized
    recipes)."""
    named = any(re.fullmatch(r"[bg]\d+", part) for part in quant.strip().lower().split("-")[1:])
    core = parse_recipe(quant, max_seq_len=max_seq_len)
    if group_size is not None:
        if not core.quantized:
            raise UnsupportedError(f"--group-size needs a quantized recipe, not {quant!r}")
        if named and group_size != core.block_size:
            raise UnsupportedError(
                f"--quant {quant!r} names group size {core.block_size}, --group-size {group_size}"
            )
        core = core.with_options(block_size=group_size)
    if max_prefill is not None and max_seq_len is not None and max_prefill > max_seq_len:
        raise UserError(f"--max-prefill {max_prefill} is above --max-seq-len {max_seq_len}")
    return ExecuTorchRecipe(with_tables(core, embedding_quant, head_bits), max_prefill, delegate)
