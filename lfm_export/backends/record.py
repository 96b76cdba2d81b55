"""The backend record: everything the CLI and the pipeline need to know about one backend, in one object.

Each backend package defines `BACKEND = Backend(...)` in its `__init__.py` (cheap to import: no torch, no
backend library; its functions import those when they run), and one line of `lfm_export.backends.REGISTRY`
names the package. The CLI builds one export command per record (`lfm-export NAME MODEL -o OUT` with the
shared options plus `options`), and the pipeline exports, opens sessions and simulates through it: neither
names a backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_export.contract.signature import IOSignature

CONTEXT_DEFAULT = (
    "default: the model's max_position_embeddings, capped at 32768, the dense models' trained context"
)


@dataclass(frozen=True)
class Option:
    """A command-line option of one backend: `--name-with-dashes`, passed to `Backend.recipe` as `name`."""

    name: str
    type: Any
    default: Any
    help: str
    min: int | None = None


TABLE_OPTIONS = (
    Option(
        "embedding_quant",
        str | None,
        None,
        "Embedding table: 8 | 4 | none (float) (default 8 when quantized; blocks of the recipe's block size).",
    ),
    Option(
        "head_bits",
        int | None,
        None,
        "lm_head: 8 | 4 (default 8 when quantized; blocks of the recipe's block size).",
    ),
)
"""`--embedding-quant` / `--head-bits` as the backends whose tables are held in the recipe's blocks take them
(read by `lfm_export.recipes.with_tables`, as ExecuTorch's own)."""


@dataclass(frozen=True)
class Runner:
    """How an artifact runs in its ecosystem's own runtime, for the model card (`lfm_export.card`): the Hugging
    Face `library_name`, the runner's name, and a shell or Python snippet where `{folder}` stands for the
    artifact folder."""

    library: str
    name: str
    language: str
    code: str


@dataclass
class ExportResult:
    """What a backend's `export` wrote: the I/O signature, the recipe as the manifest records it, and the
    backend's own manifest entries (`extra`, merged into the manifest's top level)."""

    signature: IOSignature
    recipe: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


Export = Callable[[Any, Path, Any, Any], ExportResult]
"""`(loaded model, temp folder, recipe, progress) -> ExportResult`: write the artifact files (tokenizer files
and manifest are the pipeline's)."""


@dataclass(frozen=True)
class Backend:
    """One backend.

    - `name`: the command (`lfm-export NAME`) and the manifest's `backend`.
    - `help`: the command's help. `options`: its options beyond the shared ones. `quant_default`: `--quant`'s.
    - `recipe(quant, max_seq_len, **options)`: the recipe object `export` takes.
    - `export`: see `Export`.
    - `session`: `"module:Class"` of the runtime shim that runs the artifacts (None: no shim runs here).
    - `simulation(recipe_dict) -> (core Recipe, activation mode)`: what an artifact computes, for
      `lfm_export.quant.simulate`; `weight_values(recipe_dict)`: the values its kernels hold where they are not
      the core quantizer's (`lfm_export.quant.WeightValues`), or None; `simulation_session(loaded, manifest)`:
      a session of its own where the core simulation does not apply (QNN's fake-quantized program).
    - `stored_weights`: `"module:function"` reading an artifact folder's quantized weights, dequantized in numpy
      (`(folder) -> {tensor name: float32 [N, K]}`, or `(name, array)` pairs), for the bit-exact weights part
      of exactness (`lfm_export.parity.stored_weights`); None: not checked. A backend with a
      `simulation_session` gives that session a `quantized_weights()` (`(name, array)` pairs) to compare with.
    - `exact_row`: `"module:function"` `(lfm_export.parity.exact_row.ExactInputs) -> ExactRow | None`, the
      exact row the backend's gate adds where its runtime computes in a way the scenario rows can only hold to
      statistical limits: `lfm_export.parity.boundary:exact_row` (int8 activation codes resolved: ONNX,
      ExecuTorch, GGUF), `lfm_export.parity.fp16_program:exact_row` (Core ML through the interpreter), QNN's
      graph row (`lfm_export.backends.onnx_qnn.graph_check:exact_row`). The function returns None where the row
      does not apply to the artifact (float activations, a device engine). None: no row.
    - `gates`: `"module:NAME"` of a `{name: Gate}` mapping this backend adds to the parity gates, and
      `sanity`: of a `{family: KL mean}` mapping of default quality bounds.
    - `core_codes`: the backend packs every quantized weight from the core quantizer's codes and scales
      (`lfm_export.quant.quantize_weight`), so the calibrated roundings (`-imat`, `-gptq`) reach its artifacts;
      the pipeline refuses those recipes for a backend that does not.
    - `mixes`: the backend holds a per-tensor-group precision mix (`Recipe.mix`, written by `--budget`): of the
      core precisions (int4 / int8 in blocks of 32, 64, 128, and the fewer bits its recipe's `mix_bits` lists),
      or of its recipe's own `mix_candidates` (GGUF: ggml's types, `backends.gguf.recipes.MIX_TYPES`); the
      pipeline refuses `--budget` for one that does not.
    - `install`: the pip extra that installs what `export` needs. `context_default` / `context_cost`: what
      `--max-seq-len` defaults to and what a longer context costs (its help).
    """

    name: str
    help: str
    recipe: Callable[..., Any]
    export: Export
    session: str | None
    install: str
    options: tuple[Option, ...] = ()
    quant_default: str = "fp32"
    simulation: Callable[[dict[str, Any]], tuple[Any, Any]] | None = None
    weight_values: Callable[[dict[str, Any]], Any] | None = None
    simulation_session: Callable[[Any, dict[str, Any]], Any] | None = None
    stored_weights: str | None = None
    exact_row: str | None = None
    gates: str | None = None
    sanity: str | None = None
    context_default: str = CONTEXT_DEFAULT
    context_cost: str = ""
    core_codes: bool = False
    mixes: bool = False
    runner: Runner | None = None

    def session_class(self) -> Any:
        if self.session is None:
            from lfm_export.contract.errors import UserError

            raise UserError(f"no runtime shim runs {self.name} artifacts on this machine")
        return load(self.session)

    def gate_table(self) -> Mapping[str, Any]:
        return load(self.gates) if self.gates else {}

    def stored_weights_reader(self) -> Callable[[Path], Any] | None:
        return load(self.stored_weights) if self.stored_weights else None

    def sanity_table(self) -> Mapping[str, float]:
        return load(self.sanity) if self.sanity else {}

    def exact_row_check(self) -> Callable[[Any], Any] | None:
        return load(self.exact_row) if self.exact_row else None


def load(ref: str) -> Any:
    """The object `"package.module:NAME"` names."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
