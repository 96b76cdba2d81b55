"""Positions judged apart: where a runtime computing in fp16 may choose another MoE expert than its simulation.

A router whose last selected expert leads the first unselected one by less than fp16 rounding moves the scores
is a tie the runtime breaks its own way; the expert it then runs is another matrix, so that position's logits
and the state it writes differ by far more than rounding (KL 0.33 at one position of an honest Core ML
`tiny-moe` palettize4 export), and so do the next `conv_L_cache - 1` positions, which the short convolution
mixes with it undiluted. Gates that ask for it (`Gate.router_margin`) judge such positions apart: the
simulation records, per position, its smallest top-k router margin over the MoE layers
(`lfm_export.model.MoE.router_margin`, relative to the spread of the router's choices); a position below the
gate's margin and the window after it leave the tight per-position limits (logits, KL, top-1, and the KV slots
they wrote) for the gate's `*_at_tie` ones and are reported ("N positions judged apart: expert choice within
the runtime's rounding"); every other position, later ones of the same sequence included, keeps the tight limits.
Which positions fall apart is the simulation's property, not the artifact's: a wrong artifact cannot choose
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch-free at import, as the rest of `lfm_export.parity`
    from torch import Tensor, nn

TIE_WHY = "expert choice within the runtime's rounding"


class RouterMargins:
    """Records, for each forward of a torch model with MoE layers, every position's smallest top-k router margin
    over those layers (`take()`: `[B, T]` float64, or None where the model has no MoE layer or did not run)."""

    def __init__(self, model: nn.Module) -> None:
        from lfm_export.model import MoE

        self._layers: list[np.ndarray] = []
        conv = getattr(getattr(model, "config", None), "conv_L_cache", 1)
        self.window = max(0, int(conv) - 1)
        """Positions after a tie judged apart with it: the short convolution mixes each position with the
        `conv_L_cache - 1` before it, so another expert's output at a tie reaches them undiluted."""
        self._handles = [
            mod.register_forward_pre_hook(self._hook) for mod in model.modules() if isinstance(mod, MoE)
        ]

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _hook(self, mod: nn.Module, args: tuple[Any, ...]) -> None:
        x: Tensor = args[0]
        self._layers.append(mod.router_margin(x.float()).double().numpy())  # type: ignore[operator]

    def take(self) -> np.ndarray | None:
        """The margins since the last `take`, minimum over the MoE layers; None where none was recorded."""
        if not self._layers:
            return None
        out = np.minimum.reduce(self._layers)
        self._layers = []
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def recorder_for(session: Any) -> RouterMargins | None:
    """A recorder on the torch model behind `session` (a `ReferenceSession` of the simulation), or None where
    there is none or it has no MoE layer."""
    model = getattr(session, "model", None)
    if model is None:
        return None
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    rec = RouterMargins(model)
    return rec if rec.active else None


def apart_note(count: int, margin: float) -> str:
    """The report's sentence for `count` positions judged apart under `margin`."""
    return (
        f"{count} position{'s' if count != 1 else ''} judged apart: {TIE_WHY} (the simulation's top-k router "
        f"margin below {margin:g} of the choices' spread, or within the conv window after such a tie); every "
        "other position is held to the gate's tight limits"
    )
