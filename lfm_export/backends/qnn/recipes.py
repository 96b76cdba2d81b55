"""QNN recipes: 16-bit or 8-bit activations with 8- or 4-bit weights, as ExecuTorch's `QnnQuantizer` makes them,
and the Snapdragon SoCs a QNN artifact can name. Pure data (no torch), so the CLI and the runtime shim read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lfm_export.contract.errors import UserError

QUANTS: dict[str, str] = {"16a8w": "use_16a8w", "16a4w": "use_16a4w", "8a8w": "use_8a8w"}
"""`--quant` name -> `executorch.backends.qualcomm.quantizer.quantizer.QuantDtype` member."""

PREFIX = "qnn-"
"""A QNN recipe's name is `qnn-<quant>`: the parity gate family (`lfm_export.parity.thresholds.GATES`)."""

SOCS: dict[str, tuple[int, str]] = {
    "SM8350": (30, "v68"),
    "SM8450": (36, "v69"),
    "SM8475": (42, "v69"),
    "SM8550": (43, "v73"),
    "SM8650": (57, "v75"),
    "SM8750": (69, "v79"),
    "SM8850": (87, "v81"),
    "SC8380XP": (60, "v73"),
    "QCS9100": (77, "v73"),
    "QCM6490": (93, "v68"),
}
"""SoC name -> (QNN `soc_model` id, Hexagon arch), the ids of ExecuTorch 1.5.1's `QcomChipset`. onnxruntime's
QNN provider needs one: without `soc_model` the emulated HTP failed to finalize every graph of this backend
(`QNN_COMMON_ERROR_MEM_ALLOC`, 1002), with SM8650 or SM8750 it ran (onnxruntime-qnn 2.7.0)."""

DEFAULT_SOC = "SM8750"
DEFAULT_MAX_SEQ_LEN = 128
"""The static KV cache of a QNN artifact when `--max-seq-len` is not given: every decode step attends over all of
it, and one step of `tiny` took 0.45 s on the emulated HTP at 64 positions."""


def soc_model(name: str) -> int:
    """The QNN `soc_model` id of SoC `name` (case-insensitive); an unknown name lists the known ones."""
    key = name.strip().upper()
    if key not in SOCS:
        raise UserError(f"unknown SoC {name!r}; known: {', '.join(SOCS)}")
    return SOCS[key][0]


@dataclass(frozen=True)
class QnnRecipe:
    """`quant` (16a8w / 16a4w / 8a8w), the SoC the graph is prepared for, the static context."""

    quant: str
    soc: str = DEFAULT_SOC
    max_seq_len: int | None = None
    context_binary: bool = False

    @property
    def name(self) -> str:
        return PREFIX + self.quant

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        d["activations"] = "uint16" if self.quant.startswith("16") else "uint8"
        d["weights"] = f"int{self.quant.split('a')[1].removesuffix('w')} per output channel, symmetric"
        d["soc_model"] = soc_model(self.soc)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QnnRecipe:
        return cls(
            quant=d["quant"],
            soc=d.get("soc", DEFAULT_SOC),
            max_seq_len=d.get("max_seq_len"),
            context_binary=bool(d.get("context_binary", False)),
        )


def make_recipe(
    quant: str, soc: str | None = None, max_seq_len: int | None = None, context_binary: bool = False
) -> QnnRecipe:
    """Check the CLI's values; `quant` may carry the `qnn-` prefix."""
    q = quant.strip().lower().removeprefix(PREFIX)
    if q not in QUANTS:
        raise UserError(f"QNN (onnx-qnn, executorch-qnn) takes --quant {' | '.join(QUANTS)}, got {quant!r}")
    soc_name = (soc or DEFAULT_SOC).strip().upper()
    soc_model(soc_name)
    if max_seq_len is not None and max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    return QnnRecipe(q, soc_name, max_seq_len, context_binary)
