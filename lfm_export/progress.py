"""The one progress helper: timed steps on stderr (rich), so stdout carries only results."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from rich.console import Console

_console = Console(stderr=True, highlight=False)


class Progress:
    """Prints each step with its duration; records durations for reports (`timings`)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.quiet:
            yield
        else:
            with _console.status(f"[bold]{label}[/]…", spinner="dots"):
                yield
        dt = time.perf_counter() - t0
        self.timings[label] = round(dt, 3)
        if not self.quiet:
            _console.print(f"[green]✓[/] {label} [dim]({dt:.1f}s)[/]")

    def note(self, message: str) -> None:
        if not self.quiet:
            _console.print(message)


def quiet_torchao() -> None:
    """torchao 0.18 logs a warning per CUDA-only kernel library it cannot load on import ("Failed to load
    ..._C_mxfp8...", "..._C_cutlass_90a..."): nothing the CPU backends use; and torch warns that an enum
    torchao registers is natively supported now. Both loggers are set to ERROR."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
