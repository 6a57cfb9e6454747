"""The main job on the embedded default: a RAG answer over a few documents, with and without KV reuse."""

from __future__ import annotations

import json
from importlib import resources

from ragcache.engine.generate import SamplingParams
from ragcache.engine.request import Generation, RagRequest
from ragcache.engine.runner import BlendEngine


def demo_example() -> tuple[str, tuple[str, ...]]:
    data = json.loads(resources.files("ragcache").joinpath("data/demo.json").read_text())
    return data["question"], tuple(data["documents"])


def run_demo(engine: BlendEngine, ratio: float = 0.15, max_tokens: int = 64) -> tuple[Generation, Generation]:
    """Answer the demo question by full prefill, then again from the documents' cached KV (blend@ratio)."""
    question, documents = demo_example()
    sampling = SamplingParams(max_tokens=max_tokens)
    engine.generate(RagRequest("Warm-up.", sampling=SamplingParams(max_tokens=1)))  # first-call allocations
    full = engine.generate(RagRequest(question, documents, mode="full", sampling=sampling))
    engine.add_documents(list(documents))  # what `POST /v1/documents` does ahead of queries
    blended = engine.generate(RagRequest(question, documents, mode="blend", blend_ratio=ratio, sampling=sampling))
    return full, blended


def format_demo(full: Generation, blended: Generation, ratio: float) -> str:
    question, documents = demo_example()
    speedup = full.timings.ttft_s / blended.timings.ttft_s
    return "\n".join(
        [
            f"question: {question}  ({len(documents)} documents, {full.prompt_tokens} prompt tokens)",
            f"answer (full prefill):  {full.text.strip()}",
            f"answer (blend@{ratio:g}):   {blended.text.strip()}",
            f"time to first token without reuse: {full.timings.ttft_s * 1000:8.1f} ms",
            f"time to first token with reuse:    {blended.timings.ttft_s * 1000:8.1f} ms  "
            f"({speedup:.1f}x faster; {blended.cached_tokens} tokens from cache, "
            f"{blended.recomputed_tokens} recomputed past layer 1)",
        ]
    )
