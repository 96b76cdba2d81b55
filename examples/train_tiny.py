"""Train the bundled tiny LFM2 models `tiny` (dense) and `tiny-moe` on the procedural corpus of make_corpus.py.

Writes `lfm_export/assets/tiny/` and `lfm_export/assets/tiny-moe/`: `config.json`, `model.safetensors` (fp32,
tied lm_head left out), a byte-level BPE `tokenizer.json` trained here with LFM2's special tokens at their
published ids, `tokenizer_config.json` (with the chat template), `generation_config.json` and a short README.
Training uses the canonical `lfm_export.model` (growing KV form from an empty state) and AdamW on the CPU
with 2 threads. Deterministic for a given machine (seeded data order and init).

    .venv/bin/python examples/train_tiny.py          # both models: 12 minutes measured on 2 shared cores
    .venv/bin/python examples/train_tiny.py --models small --out out/trained --max-minutes 30   # not bundled

Licence: Apache-2.0, like the corpus and the trained weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")
# Sleeping instead of spinning OpenMP workers: on a shared 2-core machine spinning made training up to 5x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpus  # noqa: E402

from lfm_export.config import LAYER_ATTN, LAYER_CONV, Lfm2Config  # noqa: E402
from lfm_export.loading import ASSETS, init_random, save_checkpoint  # noqa: E402
from lfm_export.model import MoE  # noqa: E402

SPECIAL_TOKENS = [
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_list_start|>",
    "<|tool_list_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_response_start|>",
    "<|tool_response_end|>",
]
VOCAB_SIZE = 2048
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- set ns = namespace(system="") -%}
{%- if messages and messages[0]["role"] == "system" -%}
  {%- set ns.system = messages[0]["content"] -%}
  {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
  {%- set ns.system = ns.system + ("\\n" if ns.system else "") + "List of tools: <|tool_list_start|>[" -%}
  {%- for tool in tools -%}
    {%- set ns.system = ns.system + (tool if tool is string else tool | tojson) + ("" if loop.last else ", ") -%}
  {%- endfor -%}
  {%- set ns.system = ns.system + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system -%}
  {{- "<|im_start|>system\\n" + ns.system + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
  {%- set content = message["content"] if message["content"] is string else message["content"] | tojson -%}
  {%- if message["role"] == "tool" -%}
    {%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}
  {%- endif -%}
  {{- "<|im_start|>" + message["role"] + "\\n" + content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""

GENERATION_CONFIG = {
    "bos_token_id": 1,
    # <|im_end|> ends a chat turn; <|endoftext|> ends the plain-text documents of the corpus.
    "eos_token_id": [7, 2],
    "pad_token_id": 0,
    "do_sample": True,
    "temperature": 0.3,
    "min_p": 0.15,
    "repetition_penalty": 1.05,
    "max_new_tokens": 128,
}

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|pad|>",
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "spaces_between_special_tokens": False,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "use_default_system_prompt": False,
    "chat_template": CHAT_TEMPLATE,
}

# conv and attention interleaved, attention neither first nor alone
LAYERS = (LAYER_CONV, LAYER_CONV, LAYER_ATTN, LAYER_CONV, LAYER_ATTN, LAYER_CONV)
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=LAYERS,
    max_position_embeddings=4096,
)


@dataclass(frozen=True)
class Recipe:
    name: str
    config: Lfm2Config
    steps: int
    lr: float
    batch: int = 8
    seq: int = 128
    warmup: int = 40
    seed: int = 0


RECIPES = {
    "tiny": Recipe("tiny", Lfm2Config(intermediate_size=384, **_COMMON), steps=1200, lr=5e-3),
    "tiny-moe": Recipe(
        "tiny-moe",
        Lfm2Config(
            model_type="lfm2_moe",
            intermediate_size=256,
            num_dense_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            use_expert_bias=True,
            **_COMMON,
        ),
        steps=800,
        lr=5e-3,
    ),
    # Not bundled (about 27 MB): every quantized row a multiple of 256, so GGUF K-quants apply without fallback;
    # the quality-per-byte and GGUF benchmarks train it into out/ with `--models small --out out/trained`.
    "small": Recipe(
        "small",
        Lfm2Config(
            intermediate_size=768,
            **{**_COMMON, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2},
        ),
        steps=1500,
        lr=3e-3,
    ),
}
BUNDLED = ("tiny", "tiny-moe")


# ---- tokenizer ---------------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str]) -> Tokenizer:
    """Byte-level BPE (LFM2's pre-tokenizer profile); BOS is added by the post-processor, as in LFM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|startoftext|> $A",
                pair="<|startoftext|> $A <|startoftext|> $B",
                special_tokens=[("<|startoftext|>", 1)],
            ),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    tok.train_from_iterator((piece for d in docs for piece in special.split(d) if piece), trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def encode(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


# ---- training ----------------------------------------------------------------------------------------------
class RouterLoad:
    """Counts expert selections of every MoE layer (forward hooks) for the bias update and the report."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.counts = [torch.zeros(m.gate.out_features) for m in self.moes]
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.moes)]

    def _hook(self, i: int):
        def hook(mod: MoE, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            with torch.no_grad():
                w = mod.routing(args[0].reshape(-1, args[0].shape[-1]).detach())
                self.counts[i] += (w > 0).sum(0).float()

        return hook

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def fractions(self) -> list[torch.Tensor]:
        return [c / c.sum().clamp(min=1) for c in self.counts]

    def update_bias(self, rate: float) -> None:
        """Auxiliary-loss-free balancing: raise the selection bias of under-used experts, lower over-used ones."""
        with torch.no_grad():
            for m, frac in zip(self.moes, self.fractions(), strict=True):
                m.expert_bias += rate * torch.sign(1.0 / frac.numel() - frac)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(r: Recipe, stream: torch.Tensor, max_seconds: float) -> tuple[torch.nn.Module, float, int]:
    """Train from a seeded random init; stops early (and says so) if `max_seconds` of wall time pass."""
    torch.manual_seed(r.seed)
    model = init_random(r.config, seed=r.seed).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=r.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    load = RouterLoad(model) if r.config.is_moe else None
    gen = torch.Generator().manual_seed(r.seed + 1)
    t0 = time.perf_counter()
    running = 0.0
    for step in range(r.steps):
        starts = torch.randint(0, stream.numel() - r.seq - 1, (r.batch,), generator=gen)
        window = torch.stack([stream[s : s + r.seq + 1] for s in starts.tolist()])
        x, y = window[:, :-1], window[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        logits, *_ = model(x, *model.empty_state(r.batch))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if load is not None:
            load.update_bias(1e-3)
            load.reset()
        running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
        elapsed = time.perf_counter() - t0
        if elapsed > max_seconds and step < r.steps - 1:
            print(
                f"  [{r.name}] time cap of {max_seconds:.0f}s reached: stopped after {step + 1} of {r.steps} steps"
            )
            break
        if step % 50 == 0 or step == r.steps - 1:
            print(
                f"  [{r.name}] step {step:4d}  loss {running:.3f}  lr {lr_at(step, r):.2e}  {elapsed:6.1f}s",
                flush=True,
            )
    if load is not None:
        load.close()
    return model.eval(), time.perf_counter() - t0, step + 1


# ---- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, docs_ids: list[list[int]]) -> dict[str, float]:
    """Top-1 probability, top-1 accuracy and loss over every next-token position of the held-out documents."""
    top1, correct, nll, n = [], 0, 0.0, 0
    for ids in docs_ids:
        x = torch.tensor(ids[:-1])[None]
        y = torch.tensor(ids[1:])
        logits, *_ = model(x, *model.empty_state(1))
        logp = torch.log_softmax(logits[0].float(), -1)
        p, arg = logp.exp().max(-1)
        top1 += p.tolist()
        correct += int((arg == y).sum())
        nll += float(-logp.gather(-1, y[:, None]).sum())
        n += y.numel()
    return {
        "median_top1_prob": statistics.median(top1),
        "top1_accuracy": correct / n,
        "loss": nll / n,
        "positions": n,
    }


@torch.no_grad()
def greedy(
    model: torch.nn.Module, tok: Tokenizer, prompt: str, n: int = 60, stop: tuple[int, ...] = (2, 7)
) -> str:
    ids = tok.encode(prompt, add_special_tokens=False).ids
    logits, conv, keys, values = model(torch.tensor([ids]), *model.empty_state(1))
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        logits, conv, keys, values = model(torch.tensor([[nxt]]), conv, keys, values)
    return tok.decode(out, skip_special_tokens=False)


@torch.no_grad()
def router_report(model: torch.nn.Module, docs_ids: list[list[int]]) -> list[list[float]]:
    load = RouterLoad(model)
    for ids in docs_ids:
        model(torch.tensor([ids]), *model.empty_state(1))
    fr = [[round(float(v), 3) for v in f] for f in load.fractions()]
    load.close()
    return fr


# ---- output ------------------------------------------------------------------------------------------------
def write_assets(folder: Path, model: torch.nn.Module, tok: Tokenizer, card: str) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(model, folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (folder / "README.md").write_text(card)


def card(r: Recipe, stats: dict[str, float], seconds: float, params: int) -> str:
    c = r.config
    moe = (
        f", MoE: {c.num_experts} experts (width {c.moe_intermediate_size}), top-{c.num_experts_per_tok}, "
        f"first {c.num_dense_layers} layers dense"
        if c.is_moe
        else ""
    )
    return (
        f"# {r.name}\n\n"
        f"A tiny {c.model_type} model trained by `examples/train_tiny.py` on the procedural English corpus of\n"
        f"`examples/make_corpus.py` (stories, facts, dialogues, ChatML chats). Licence: Apache-2.0.\n"
        f"For tests and demos of the export toolchain; it knows nothing beyond that corpus.\n\n"
        f"- {params:,} parameters, hidden {c.hidden_size}, layers {', '.join(c.layer_types)}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, ffn {c.intermediate_size}{moe}\n"
        f"- vocab {c.vocab_size} (byte-level BPE, LFM2 special tokens at ids 0-13), tied embeddings, fp32\n"
        f"- trained {r.steps} steps x {r.batch} x {r.seq} tokens, AdamW lr {r.lr}, {seconds:.0f} s on 2 CPU threads\n"
        f"- held-out: median top-1 probability {stats['median_top1_prob']:.3f}, top-1 accuracy "
        f"{stats['top1_accuracy']:.3f}, loss {stats['loss']:.3f} over {stats['positions']} positions\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(BUNDLED))
    ap.add_argument("--out", type=Path, default=ASSETS, help="parent folder of the asset folders")
    ap.add_argument("--steps", type=int, default=None, help="override the step count of every model")
    ap.add_argument("--max-minutes", type=float, default=6.75, help="wall-time cap per model (stops early)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_all = time.perf_counter()

    train_docs, heldout_docs = make_corpus.splits()
    t = time.perf_counter()
    tok = train_tokenizer(train_docs)
    stream = torch.tensor([i for ids in encode(tok, train_docs) for i in ids], dtype=torch.long)
    heldout_ids = encode(tok, heldout_docs)
    print(
        f"corpus: {len(train_docs)} train docs ({stream.numel():,} tokens), {len(heldout_docs)} held-out docs; "
        f"tokenizer vocab {tok.get_vocab_size()} ({time.perf_counter() - t:.1f}s)",
        flush=True,
    )

    for name in args.models:
        r = RECIPES[name]
        if args.steps is not None:
            r = Recipe(**{**r.__dict__, "steps": args.steps})
        print(f"training {name}: {r.steps} steps, batch {r.batch} x {r.seq}", flush=True)
        model, seconds, done = train(r, stream, args.max_minutes * 60)
        r = Recipe(**{**r.__dict__, "steps": done})
        stats = evaluate(model, heldout_ids)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name}: {params:,} params, trained in {seconds:.1f}s ({seconds / 60:.2f} min); held-out median top-1 "
            f"prob {stats['median_top1_prob']:.3f}, top-1 acc {stats['top1_accuracy']:.3f}, "
            f"loss {stats['loss']:.3f} ({stats['positions']} positions)",
            flush=True,
        )
        if r.config.is_moe:
            for i, fr in enumerate(router_report(model, heldout_ids[:100])):
                print(f"  MoE layer {r.config.num_dense_layers + i} expert load: {fr}")
        for prompt in (
            "<|startoftext|>Once upon a time, there was",
            make_corpus.render_chat(
                [{"role": "user", "content": "What does a cow say?"}], add_generation_prompt=True
            ),
            make_corpus.render_chat(
                [{"role": "user", "content": "Tell me a short story about a fox."}],
                add_generation_prompt=True,
            ),
        ):
            print(f"  sample: {prompt!r} -> {greedy(model, tok, prompt, n=80)!r}")
        folder = args.out / name
        write_assets(folder, model, tok, card(r, stats, seconds, params))
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"  wrote {folder} ({size / 1e6:.2f} MB)", flush=True)
    print(f"total {time.perf_counter() - t_all:.1f}s", flush=True)


if __name__ == "__main__":
    main()
