"""`ragcache bench rag`: TTFT and fidelity of full / prefix / reuse / blend@r on a RAG dataset.

Each document's KV is computed once before timing, as a warm deployment would have it.
Then every question runs in every mode; fidelity is measured against the full-prefill
run of the same question (same prompt ids), answer quality against the gold answers.

Blend modes can carry a selection, so that selections compare at equal recomputed
fractions (every selection recomputes plain top-r's count of tokens):

    blend@0.15                the engine's own selection (BlendConfig)
    blend@0.15/key            key deviation, no sink tokens ('value', 'key', 'attention')
    blend@0.15/epic4          EPIC: each reused chunk's first 4 tokens, then value deviation
    blend@0.15/attention+epic4  EPIC's sink tokens, then the named deviation
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ragcache.bench.metrics import best_f1, kl_divergence, percentile, token_f1
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.request import Generation, RagRequest
from ragcache.engine.runner import BlendEngine
from ragcache.engine.selection import parse_selection as engine_selection


@dataclass(frozen=True)
class RagExample:
    question: str
    answers: tuple[str, ...]
    documents: tuple[str, ...]


DEFAULT_SELECTION = "default"


@dataclass(frozen=True)
class Selection:
    """A blend mode's selection as request overrides; None: the engine's own."""

    deviation: str | None = None
    sink_tokens: int | None = None


def parse_selection(name: str) -> Selection:
    """'default' (whatever the engine uses) or a named selection (engine.selection.parse_selection),
    which fixes both knobs so its figures do not depend on the engine's configuration."""
    if name == DEFAULT_SELECTION:
        return Selection()
    try:
        return Selection(*engine_selection(name))
    except ValueError as exc:
        raise ValueError(f"--selections: {exc}, or 'default'") from None


@dataclass(frozen=True)
class BenchOptions:
    limit: int | None = None
    docs: int | None = None
    ratios: tuple[float, ...] = (0.05, 0.15, 0.3)
    max_tokens: int = 32
    roundtrip_codec: str | None = None  # cached KV as it would come back from Redis through this codec
    selections: tuple[str, ...] = (DEFAULT_SELECTION,)  # per blend ratio, one mode each (parse_selection)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"--limit must be positive, got {self.limit}")
        if self.docs is not None and self.docs <= 0:
            raise ValueError(f"--docs must be positive, got {self.docs}")
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"--ratios must be values in [0, 1], got {self.ratios}")
        if not self.selections:
            raise ValueError("--selections must name at least one selection")
        for name in self.selections:
            parse_selection(name)


@dataclass
class ModeRuns:
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    recomputed_fraction: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    fidelity_f1: list[float] = field(default_factory=list)
    first_token_agreement: list[float] = field(default_factory=list)
    first_token_kl: list[float] = field(default_factory=list)


def load_examples(path: Path, options: BenchOptions) -> list[RagExample]:
    """Read a JSON list of {question, answers, ctxs: [{text}]} (musique_dev.json's shape)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"cannot read dataset {str(path)!r}: {exc}") from exc
    if not isinstance(rows, list):
        raise InvalidRequestError(f"dataset {str(path)!r} must be a JSON list of questions")
    examples = []
    for index, row in enumerate(rows[: options.limit]):
        try:
            documents = tuple(ctx["text"] for ctx in row["ctxs"])[: options.docs]
            examples.append(RagExample(row["question"], tuple(row["answers"]), documents))
        except (KeyError, TypeError) as exc:
            raise InvalidRequestError(f"dataset row {index} lacks question/answers/ctxs[].text ({exc})") from exc
    if not examples:
        raise InvalidRequestError(f"dataset {str(path)!r} holds no questions")
    return examples


def mode_names(ratios: Sequence[float], selections: Sequence[str] = (DEFAULT_SELECTION,)) -> list[str]:
    """full, prefix, reuse, then blend@r for every ratio, one per selection ('/name' unless the default)."""
    suffixes = ["" if name == DEFAULT_SELECTION else f"/{name}" for name in selections]
    return ["full", "prefix", "reuse", *(f"blend@{r:g}{suffix}" for r in ratios for suffix in suffixes)]


def request_for(example: RagExample, mode: str, max_tokens: int) -> RagRequest:
    """The request of a mode name: 'full', 'blend@0.15', 'blend@0.15/epic4' (module docstring). It bypasses
    the prefix cache: each mode is measured on the question as if first seen, never on another mode's KV."""
    base, _, selection = mode.partition("/")
    kind, _, ratio = base.partition("@")
    chosen = parse_selection(selection or DEFAULT_SELECTION)
    return RagRequest(
        example.question,
        example.documents,
        mode=kind,
        blend_ratio=float(ratio) if ratio else None,
        blend_deviation=chosen.deviation,
        blend_sink_tokens=chosen.sink_tokens,
        sampling=SamplingParams(max_tokens=max_tokens),
        prefix_cache=False,
    )


def run_rag_bench(engine: BlendEngine, examples: list[RagExample], options: BenchOptions) -> dict:
    modes = mode_names(options.ratios, options.selections)
    for example in tqdm(examples, desc="caching documents", unit="question"):
        engine.add_documents(list(example.documents))
    codec_ratio = roundtrip_through_codec(engine.store, options.roundtrip_codec) if options.roundtrip_codec else None
    engine.generate(request_for(examples[0], "full", 2))  # warm-up: first-call allocations are not timed
    runs = {mode: ModeRuns() for mode in modes}
    progress = tqdm(total=len(examples) * len(modes), desc="running modes", unit="run")
    for example in examples:
        reference: Generation | None = None
        for mode in modes:
            result = engine.generate(request_for(example, mode, options.max_tokens), return_logprobs=True)
            reference = reference or result
            _record(runs[mode], example, result, reference)
            progress.update()
    progress.close()
    summary = _summary(engine, examples, runs)
    summary["codec"] = {"name": options.roundtrip_codec or "none", "compression_ratio": codec_ratio}
    return summary


def roundtrip_through_codec(store, codec: str) -> float:
    """Replace every cached chunk by encode -> decode through codec; return raw bytes / encoded bytes."""
    from ragcache.storage.codec import decode_chunk, encode_chunk

    raw_bytes = encoded_bytes = 0
    for tier in store.local:
        for key in tier.keys():
            chunk = tier.get(key)
            data = encode_chunk(chunk, codec)
            raw_bytes += chunk.nbytes
            encoded_bytes += len(data)
            tier.put(key, decode_chunk(data, chunk.model_fingerprint))
    return raw_bytes / encoded_bytes


def _record(runs: ModeRuns, example: RagExample, result: Generation, reference: Generation) -> None:
    runs.ttft_s.append(result.timings.ttft_s)
    runs.prompt_tokens.append(result.prompt_tokens)
    runs.recomputed_fraction.append(result.recomputed_fraction)
    runs.f1.append(best_f1(result.text, example.answers))
    runs.fidelity_f1.append(token_f1(result.text, reference.text))
    first, first_ref = result.token_ids[:1], reference.token_ids[:1]
    runs.first_token_agreement.append(float(first == first_ref))
    # both generated with return_logprobs=True, which keeps the first token's distribution
    assert reference.first_token_logprobs is not None and result.first_token_logprobs is not None
    runs.first_token_kl.append(kl_divergence(reference.first_token_logprobs, result.first_token_logprobs))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _summary(engine: BlendEngine, examples: list[RagExample], runs: dict[str, ModeRuns]) -> dict:
    prompt_tokens = runs["full"].prompt_tokens
    return {
        "model": engine.loaded.name,
        "device": str(engine.loaded.device),
        "dtype": str(engine.loaded.dtype).removeprefix("torch."),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads",
        "blend": {
            "check_layer": engine.config.blend.check_layer,
            "deviation": engine.config.blend.deviation,
            "sink_tokens": engine.config.blend.sink_tokens,
        },
        "questions": len(examples),
        "documents_per_question": len(examples[0].documents),
        "prompt_tokens_p50": percentile(prompt_tokens, 50),
        "modes": {
            mode: {
                "ttft_p50_s": percentile(r.ttft_s, 50),
                "ttft_p90_s": percentile(r.ttft_s, 90),
                "prompt_tokens_p50": percentile(r.prompt_tokens, 50),
                "recomputed_fraction": _mean(r.recomputed_fraction),
                "f1": _mean(r.f1),
                "fidelity_f1": _mean(r.fidelity_f1),
                "first_token_agreement": _mean(r.first_token_agreement),
                "first_token_kl": _mean(r.first_token_kl),
            }
            for mode, r in runs.items()
        },
    }


def format_table(summary: dict) -> str:
    full_ttft = summary["modes"]["full"]["ttft_p50_s"]
    width = max(12, *(len(mode) for mode in summary["modes"]))
    header = (
        f"{'mode':<{width}} {'TTFT p50 s':>10} {'p90 s':>7} {'speedup':>7} {'tokens':>7} {'recomp':>7} "
        f"{'F1':>5} {'fid F1':>6} {'1st agr':>7} {'1st KL':>8}"
    )
    lines = [
        f"model {summary['model']} on {summary['device']} ({summary['dtype']}), {summary['machine']}; "
        f"{summary['questions']} questions x {summary['documents_per_question']} documents, "
        f"prompt tokens p50 {summary['prompt_tokens_p50']:.0f}; blend check layer "
        f"{summary['blend']['check_layer']}, {summary['blend']['deviation']} deviation"
        + (
            f"; cached KV through codec {summary['codec']['name']} "
            f"(compression {summary['codec']['compression_ratio']:.2f}x)"
            if summary["codec"]["compression_ratio"]
            else ""
        ),
        header,
        "-" * len(header),
    ]
    for mode, m in summary["modes"].items():
        lines.append(
            f"{mode:<{width}} {m['ttft_p50_s']:>10.3f} {m['ttft_p90_s']:>7.3f} {full_ttft / m['ttft_p50_s']:>6.1f}x "
            f"{m['prompt_tokens_p50']:>7.0f} {m['recomputed_fraction']:>7.3f} {m['f1']:>5.2f} {m['fidelity_f1']:>6.2f} "
            f"{m['first_token_agreement']:>7.2f} {m['first_token_kl']:>8.4f}"
        )
    return "\n".join(lines)
