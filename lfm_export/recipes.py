"""Backend-neutral export recipes: what a recipe name means, whatever the target.

A recipe says how weights and activations are represented; a backend adds only its own knobs (ONNX `ops` and
`accuracy_level`, an ExecuTorch delegate, a Core ML target). Names read the same everywhere:

    fp32 | fp16 | bf16                          float weights and activations
    int8-b32, int4-b64, int4-g128               block-wise weights (`g` is accepted for `b`: MLX's "group")
    int8-pc                                     int8 weights per output channel (one scale per row; `b0`, as
                                                ExecuTorch's `--group-size 0`, is accepted for `pc`)
    ...-asym                                    per-block zero points (default: symmetric)
    ...-a8                                      dynamic per-token int8 activations (ExecuTorch's `8da4w`)
    ...-mse                                     scales chosen by a rounding search (see `lfm_export.quant`)
    ...-fit                                     scales (and zero points) refitted by least squares to the codes
                                                of each candidate scale (`lfm_export.quant.fit_blocks`)
    ...-imat, ...-gptq                          calibrated rounding (`lfm_export.rounding`): the scale search
                                                weighted by input importance, or error-compensating rounding
    ...-awq                                     activation-aware per-channel scales folded into the RMSNorm
                                                weights before quantization (`lfm_export.awq`); last

Aliases from other ecosystems map onto these: `8da4w` = `int4-b128-a8` (ExecuTorch's own group size for it), `8da8w` = `int8-pc-a8` (ExecuTorch's
own `8da8w` is per channel: torchao `PerAxis(0)` at its group size 0, the only int8 form XNNPACK lowers), `int4`
= `int4-b32`, `int8` = `int8-b32`. Every recipe belongs to one parity gate family (`gate_family`).

What stays float in every quantized recipe (`KEEP_FLOAT`, the manifest's words): the MoE router (rounding must
not change which experts are chosen), the norms, the conv and KV state, the rotary tables; which weight is held
at which bits is `lfm_export.precision`'s rule list. The lm_head and the embedding table
are int8 in int4 recipes (`HEAD_BITS`): every logit reads all of the head. On `tiny`, an int4 head gives pooled
KL 0.084, the int8 one 0.042 (ONNX). `--head-bits` / `--embedding-quant` change them on the backends that take
those options, read one way by `with_tables`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import UnsupportedError

FLOAT_DTYPES = ("fp32", "fp16", "bf16")
WEIGHT_BITS = (4, 8)
MIX_BITS = (2, 3, 5, 6, *WEIGHT_BITS)
"""Bits a precision mix's group may hold (`Recipe.mix`): the recipe bits, and 2 or 3 where a backend's format holds
them (`lfm_export.budget.candidates`: 3 on MLX's `quantized_matmul`, 2 on onnxruntime's MatMulNBits); 3 to 6 only
as GGUF's K-quants (`MIX_SUPER_BLOCK`) and 5 as ggml's 32-value Q5_0; a recipe's own bits are `WEIGHT_BITS`."""
BLOCK_SIZES = (32, 64, 128)
MIX_SUPER_BLOCK = 256
"""The block of a mix entry that names a ggml K-quant (Q3_K / Q4_K / Q5_K / Q6_K by its bits: 256-value super-blocks
with their own sub-block scales, `lfm_export.ggml_kquants`); only the GGUF backend offers it
(`lfm_export.backends.gguf.recipes.MIX_TYPES`)."""
PER_CHANNEL = 0
"""`block_size` of a per-output-channel recipe (`-pc`): one block spans a weight's whole input dimension.
Only int8 takes it (an int4 row needs blocks); each backend that cannot hold it refuses it."""
ACTIVATIONS = ("float", "int8")
ROUNDINGS = ("nearest", "mse", "fit", "imat", "gptq")
CALIBRATED_ROUNDINGS = ("imat", "gptq")
"""Roundings that need statistics of the linears' inputs over a calibration text (`lfm_export.calibrate`):
`imat` weighs the `-mse` scale search by each input channel's mean square (llama.cpp's importance matrix),
`gptq` rounds column by column and compensates each rounding error on the columns not yet rounded (GPTQ),
with the inputs' second-moment matrix. Both are symmetric and give ordinary codes and scales."""
ACT_FLOAT = "float"
ACT_INT8_BLOCK = "int8-block"
ACT_INT8_TOKEN = "int8-token"
ACT_FP16 = "fp16"
ACT_FP16_ROUTED = "fp16-routed"
ACT_GGML_Q8_0 = "ggml-q8_0"
ACT_GGML_K = "ggml-k"
ACT_BF16 = "bf16"
ACTIVATION_MODES = (
    ACT_FLOAT,
    ACT_INT8_BLOCK,
    ACT_INT8_TOKEN,
    ACT_FP16,
    ACT_FP16_ROUTED,
    ACT_GGML_Q8_0,
    ACT_GGML_K,
    ACT_BF16,
)
"""How a runtime rounds the inputs of the quantized linears; `lfm_export.quant` says exactly how and simulates
each. `float`: none; `int8-block`: onnxruntime MatMulNBits at accuracy_level 4 (symmetric int8 per block of the
weight's block size along K); `int8-token`: dynamic per-token asymmetric int8 (torchao / ExecuTorch `8da4w`,
what the recipe's `-a8` means); `fp16`: the runtime computes in fp16 (Core ML), the simulation rounds the
linears' inputs to fp16 and the parity gate is the `-fp16` one; `fp16-routed`: the same for a model with MoE
routing, whose gate (`-fp16-moe`) judges apart the positions where fp16 rounding can choose another expert; `ggml-q8_0`:
llama.cpp's CPU kernels (symmetric int8 per block of 32 with an fp16 scale, the input of Q8_0 / Q4_0 matmuls);
`ggml-k`: Q8_K blocks (256 values, one float32 scale), the input of K-quant matmuls (GGUF gives the mode per tensor, by its ggml type); `bf16`: llama.cpp's CPU rounds the input of a BF16
matmul to bf16 (every linear but the MoE router, which it holds in F32), the gate is the `-bf16` one."""
ACT_NATIVE = "native"
"""`lfm_export.quant.simulate`'s mode for float recipes computed in their own type (fp16 / bf16 matmuls and
residual stream; the canonical model's norm statistics, softmax, rotary tables and MoE routing stay fp32, as it
is written): the canonical model itself run by torch at that dtype. What an MLX fp16 / bf16 artifact (and an
ExecuTorch fp16 one) computes. Without it a float recipe is simulated with rounded weights and fp32 compute
(what onnxruntime's fp16 is closest to). Not one of `ACTIVATION_MODES`: it rounds no linear's inputs."""
HEAD_BITS = 8
DEFAULT_CONTEXT_CAP = 32768
"""Context declared when none is asked for: the model's, capped at the trained context of the dense models."""
KEEP_FLOAT = ("moe router", "norms", "conv and KV state", "rotary tables")

ALIASES = {
    "8da4w": "int4-b128-a8",
    "8da8w": "int8-pc-a8",
    "q4": "int4-b32",
    "q8": "int8-b32",
}

_GRAMMAR = (
    "expected fp32, fp16, bf16, or int4 / int8 with optional -bN (N in 32, 64, 128; int8 also -pc, per "
    "channel), -asym, -a8, -mse | -fit | -imat | -gptq, -awq "
    f"(aliases: {', '.join(ALIASES)})"
)


@dataclass(frozen=True)
class Recipe:
    """How an artifact represents the model.

    - `dtype`: float type of activations and of every weight that is not quantized (fp32 | fp16 | bf16).
    - `bits`: weight bits of the quantized linears (4 | 8), None for a float recipe.
    - `block_size`: quantization block (group) along each weight's input dimension; `PER_CHANNEL` (0): the
      whole row (`block_for`).
    - `symmetric`: no zero points (default) or per-block zero points.
    - `activations`: `float`, or `int8` (dynamic per-token int8 activations into the quantized linears).
    - `rounding`: `nearest` (scale from the block's extreme), `mse` (per-block scale search), `fit` (per-block
      least-squares refit over candidate scales), or a calibrated one of `CALIBRATED_ROUNDINGS`.
    - `head_bits` / `embedding_bits`: bits of the lm_head and the embedding table (None: float).
    - `max_seq_len`: the context the artifact declares; None = the model's, capped at 32768.
    - `awq`: activation-aware scales folded into the RMSNorm weights before quantization (`lfm_export.awq`).
    - `mix`: per tensor group, `(pattern, bits, block_size)` chosen to a budget (`lfm_export.budget`): each
      overrides the recipe's bits and block for the linears whose name matches `pattern` (a
      `lfm_export.precision` pattern; block `PER_CHANNEL`, int8 only: one scale per output channel, where a
      backend holds int8 no other way, ExecuTorch's XNNPACK); empty: one precision for every linear.
    """

    dtype: str = "fp32"
    bits: int | None = None
    block_size: int = 32
    symmetric: bool = True
    activations: str = "float"
    rounding: str = "nearest"
    head_bits: int | None = None
    embedding_bits: int | None = None
    max_seq_len: int | None = None
    mix: tuple[tuple[str, int, int], ...] = ()
    awq: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"float type {self.dtype!r} is unknown; expected one of {', '.join(FLOAT_DTYPES)}"
            )
        if self.bits is not None and self.bits not in WEIGHT_BITS:
            raise UnsupportedError(f"weight bits {self.bits} not supported; expected 4 or 8")
        if self.block_size == PER_CHANNEL and self.bits != 8:
            raise UnsupportedError(
                "per-channel weights (-pc, block 0) are int8 only; int4 takes blocks of 32-128"
            )
        if self.block_size not in (*BLOCK_SIZES, PER_CHANNEL):
            raise UnsupportedError(
                f"block size {self.block_size} is not supported; expected one of {', '.join(map(str, BLOCK_SIZES))}"
            )
        if self.activations not in ACTIVATIONS:
            raise UnsupportedError(
                f"activations {self.activations!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.rounding not in ROUNDINGS:
            raise UnsupportedError(f"rounding {self.rounding!r}; expected one of {', '.join(ROUNDINGS)}")
        if self.bits is None and (
            self.activations != "float" or self.rounding != "nearest" or not self.symmetric
        ):
            raise UnsupportedError("-a8, -mse, -fit and -asym need a quantized recipe (int4 or int8)")
        if self.rounding in CALIBRATED_ROUNDINGS and not self.symmetric:
            raise UnsupportedError(f"-{self.rounding} rounding is symmetric only; drop -asym")
        for what, b in (("head", self.head_bits), ("embedding", self.embedding_bits)):
            if b is not None and b not in WEIGHT_BITS:
                raise UnsupportedError(f"{what} bits {b} not supported; expected 4, 8 or float")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise UnsupportedError(f"--max-seq-len must be positive, got {self.max_seq_len}")
        if self.awq and not self.quantized:
            raise UnsupportedError("-awq scales weights for quantization; it needs a quantized recipe")
        if self.mix and not self.quantized:
            raise UnsupportedError("a precision mix (--budget) needs a quantized recipe (int4 or int8)")
        for pattern, b, block in self.mix:
            core = b in (2, 3, *WEIGHT_BITS) and block in BLOCK_SIZES
            ggml = (b in (3, 4, 5, 6) and block == MIX_SUPER_BLOCK) or (b, block) == (5, 32)  # Q5_0
            if not (core or ggml or (b, block) == (8, PER_CHANNEL)):
                raise UnsupportedError(
                    f"mix entry {pattern}: int{b}-b{block} is no block precision (nor int8 per channel)"
                )

    # ---- derived --------------------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def per_channel(self) -> bool:
        return self.block_size == PER_CHANNEL

    def block_for(self, k: int) -> int:
        """The block a weight with input dimension `k` is quantized in: the recipe's, or `k` per channel."""
        return k if self.per_channel else self.block_size

    @property
    def quant(self) -> str:
        """`fp32`, `fp16`, `bf16`, `int8` or `int4`: the precision word of the name."""
        return f"int{self.bits}" if self.bits else self.dtype

    @property
    def name(self) -> str:
        """`fp32`, `int4-b32`, `int8-b128-asym`, `int4-b32-a8`: the name shared by every backend."""
        if not self.quantized:
            return self.dtype
        parts = [self.quant, "pc" if self.per_channel else f"b{self.block_size}"]
        if not self.symmetric:
            parts.append("asym")
        if self.activations == "int8":
            parts.append("a8")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        if self.awq:
            parts.append("awq")
        return "-".join(parts)

    @property
    def gate_family(self) -> str:
        """The parity gate this recipe is judged by: `fp32`, `fp16`, `bf16`, `int8` or `int4` (a mix holding
        any group below 8 bits: `int4`)."""
        if any(bits < 8 for _, bits, _ in self.mix):
            return "int4"
        return self.quant

    def context(self, cfg: Lfm2Config) -> int:
        return self.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_CONTEXT_CAP)

    def with_options(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    def check_model(self, cfg: Lfm2Config, weight_shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a recipe the model cannot take, before any tracing: a context beyond the model's, or a block
        size that does not divide a weight's input dimension (the weight is named)."""
        if self.max_seq_len is not None and self.max_seq_len > cfg.max_position_embeddings:
            raise UnsupportedError(
                f"--max-seq-len {self.max_seq_len} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if not self.quantized:
            return
        for name, shape in weight_shapes.items():
            if len(shape) == 2 and shape[1] % self.block_for(shape[1]):
                fits = ", ".join(str(b) for b in BLOCK_SIZES if shape[1] % b == 0) or "none"
                raise UnsupportedError(
                    f"block size {self.block_size} does not divide the input dimension {shape[1]} of {name}; "
                    f"choose one of {fits}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        d["quant"] = self.quant
        d["gate_family"] = self.gate_family
        d["keep_float"] = list(KEEP_FLOAT) if self.quantized else []
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "mix" in fields:
            fields["mix"] = tuple((str(p), int(b), int(bs)) for p, b, bs in fields["mix"])
        return cls(**fields)


def parse_recipe(
    text: str,
    *,
    block_size: int | None = None,
    asymmetric: bool = False,
    max_seq_len: int | None = None,
) -> Recipe:
    """A recipe from its name (or an alias). `block_size` / `asymmetric` are the older separate flags
    (`--quant int4 --block-size 64`); they may not contradict the name."""
    raw = text.strip().lower()
    name = ALIASES.get(raw, raw)
    parts = name.split("-")
    head, rest = parts[0], parts[1:]
    kw: dict[str, Any] = {"max_seq_len": max_seq_len}
    if head in FLOAT_DTYPES:
        kw["dtype"] = head
    elif head in ("int4", "int8"):
        kw["bits"] = int(head[3:])
        kw["head_bits"] = kw["embedding_bits"] = HEAD_BITS
    else:
        raise UnsupportedError(f"--quant {text!r} is unknown; {_GRAMMAR}")
    named_block = None
    for part in rest:
        if part[:1] in ("b", "g") and part[1:].isdigit() and "bits" in kw and named_block is None:
            named_block = int(part[1:])
        elif part == "pc" and "bits" in kw and named_block is None:
            named_block = PER_CHANNEL
        elif part == "asym" and "bits" in kw and kw.get("symmetric", True):
            kw["symmetric"] = False
        elif part == "a8" and "bits" in kw and "activations" not in kw:
            kw["activations"] = "int8"
        elif part in ROUNDINGS[1:] and "bits" in kw and "rounding" not in kw and "awq" not in kw:
            kw["rounding"] = part
        elif part == "awq" and "bits" in kw and "awq" not in kw:
            kw["awq"] = True
        else:
            raise UnsupportedError(f"--quant {text!r} is unknown; {_GRAMMAR}")
    if block_size is not None and named_block is not None and block_size != named_block:
        raise UnsupportedError(
            f"--quant {text!r} names block size {named_block}, --block-size says {block_size}"
        )
    if asymmetric:
        if "bits" not in kw:
            raise UnsupportedError(f"--asymmetric needs a quantized recipe, not {text!r}")
        kw["symmetric"] = False
    chosen = named_block if named_block is not None else block_size
    if chosen is not None:
        kw["block_size"] = chosen
    return Recipe(**kw)


HEAD_CHOICES = (4, 8)
"""`--head-bits`: the lm_head at 8 bits (`HEAD_BITS`, the default) or 4, in blocks of the recipe's block size on
every backend but ExecuTorch, whose int8 head is per output channel (its `recipes` module)."""
EMBEDDING_CHOICES = ("8", "4", "none")
"""`--embedding-quant`: the embedding table at 8 bits (the default), 4, or float (`none`), in blocks of the
recipe's block size (ExecuTorch's int8 table: per row)."""


def with_tables(recipe: Recipe, embedding: str | None = None, head_bits: int | None = None) -> Recipe:
    """`recipe` with the lm_head and the embedding table as `--head-bits` / `--embedding-quant` ask, the one
    reading of those options on every backend that takes them: float for float recipes (either option then
    refused); for quantized ones the `head_bits` head (None: `HEAD_BITS`) and the `embedding` choice of
    `EMBEDDING_CHOICES` (None: 8). A backend refuses what its format cannot hold."""
    if embedding is not None and embedding not in EMBEDDING_CHOICES:
        raise UnsupportedError(f"--embedding-quant {embedding!r} is unknown; expected 8, 4 or none")
    if head_bits is not None and head_bits not in HEAD_CHOICES:
        raise UnsupportedError(f"--head-bits {head_bits} is unknown; expected 4 or 8")
    if not recipe.quantized:
        if embedding not in (None, "none"):
            raise UnsupportedError(
                f"--embedding-quant {embedding} needs a quantized recipe, not {recipe.name}"
            )
        if head_bits is not None:
            raise UnsupportedError(f"--head-bits {head_bits} needs a quantized recipe, not {recipe.name}")
        return recipe.with_options(head_bits=None, embedding_bits=None)
    embedding = embedding or str(HEAD_BITS)
    return recipe.with_options(
        head_bits=head_bits or HEAD_BITS, embedding_bits=None if embedding == "none" else int(embedding)
    )


def recipe_names() -> list[str]:
    """Every canonical recipe name with the default block size (for help texts and tests)."""
    names = list(FLOAT_DTYPES)
    for q in ("int8", "int4"):
        names += [f"{q}-b32", f"{q}-b32-asym", f"{q}-b32-a8", f"{q}-b32-mse"]
    return [*names, "int8-pc", "int8-pc-a8"]
