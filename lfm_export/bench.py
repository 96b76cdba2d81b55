"""`lfm-export bench`: load time, prefill and decode throughput, peak RSS and size of an artifact, through its
runtime shim (torch-free, so RSS is the runtime's own).

Prefill is timed the way `lfm-export run` prefills (`prefill_for_generation`: the last position's logits only,
through `prefill_last` where the session has it, as ExecuTorch's and MLX's do), not the every-position
`prefill` parity uses (on ExecuTorch that is one-token calls for every position and then the prompt again). A
warm-up pass over the same prompt precedes each timed phase: first runs allocate and pick kernels per shape."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import ContextLimitError
from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.manifest import read_manifest
from lfm_export.runtime.prefill import prefill_for_generation


def bench_artifact(
    folder: Path, prompt_len: int = 512, new_tokens: int = 128, threads: int = DEFAULT_THREADS, seed: int = 0
) -> dict[str, Any]:
    from lfm_export.backends import open_session

    manifest = read_manifest(folder)
    t0 = time.perf_counter()
    session = open_session(folder, threads=threads)
    load_s = time.perf_counter() - t0
    if session.max_seq_len is not None and prompt_len + new_tokens > session.max_seq_len:
        raise ContextLimitError(
            f"prompt {prompt_len} + {new_tokens} new tokens exceeds the artifact's max_seq_len {session.max_seq_len}"
        )
    rng = np.random.default_rng(seed)
    prompt = rng.integers(16, session.vocab_size, size=(1, prompt_len), dtype=np.int64)

    session.reset(1)  # warm-up: the same shapes as the timed run
    session.decode(prefill_for_generation(session, prompt).argmax(-1))

    session.reset(1)
    t0 = time.perf_counter()
    logits = prefill_for_generation(session, prompt)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = session.decode(token).argmax(-1)
    decode_s = time.perf_counter() - t0
    return {
        "artifact": str(folder),
        "backend": manifest["backend"],
        "recipe": manifest["recipe"].get("name"),
        "threads": threads,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "load_s": round(load_s, 3),
        "prefill_tok_s": round(prompt_len / prefill_s, 2),
        "prefill_path": "prefill_last" if hasattr(session, "prefill_last") else "prefill",
        "decode_tok_s": round(new_tokens / decode_s, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "artifact_bytes": manifest.get("total_bytes"),
    }
