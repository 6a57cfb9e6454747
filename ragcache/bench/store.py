"""`ragcache bench store`: what each codec and each tier costs, and the TTFT a hit in each tier gives.

    codecs    every wire codec (storage/codec.py) on real 512-token chunk KV of the default
              model: size against float16, encode and decode MB/s
    tiers     device, cpu and redis: put and get MB/s, get latency p50 / p99, per chunk size
              (the model's chunk; a Llama-3-8B-sized chunk of random float16)
    ttft_s    a reuse-mode RAG request whose prefix and chunks are only in one tier (or nowhere:
              miss), median over repeats; the rounds interleave the tiers so load drifts evenly

MB is 10^6 bytes of KV as the model holds it (KVChunk.nbytes: float32 for the default model);
codec MB/s are at the median encode / decode, tier MB/s over all repeats.
Memory tiers hold references on the model's device, so on a CPU-only machine their put and
get are bookkeeping, not copies. Compression ratios come from real KV only: random tensors
(the 8B-sized chunk) do not compress like KV, so that chunk measures speed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch

from ragcache.bench.metrics import percentile
from ragcache.engine.generate import SamplingParams
from ragcache.engine.loader import LoadedModel
from ragcache.engine.request import Generation, RagRequest
from ragcache.engine.runner import BlendEngine
from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import KVTier
from ragcache.storage.codec import CODECS, decode_chunk, encode_chunk
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TIER_NAMES = ("device", "cpu", "redis")
TARGET_RATIO = 3.5  # a compressing codec at least this much smaller than float16
TARGET_REDIS_VS_CPU = 1.5  # a Redis-tier hit's TTFT within this factor of a CPU-tier hit's
MEMORY_TIER_BYTES = 8 << 30
REDIS_TIMEOUT_S = 5.0  # per round trip; generous so that a loaded machine measures slowness, not misses

Progress = Callable[[str], None]


class ChunkShape(NamedTuple):
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int


LLAMA3_8B = ChunkShape(32, 8, 512, 128)


@dataclass(frozen=True)
class StoreBenchOptions:
    chunk_tokens: int = 512
    chunks: int = 6  # distinct real chunks; also the RAG request's documents
    repeats: int = 30  # tier puts and gets per chunk size (p99 of 30 is close to the maximum)
    codec_repeats: int = 3  # passes over the chunks per codec
    ttft_repeats: int = 5
    redis_url: str | None = DEFAULT_REDIS_URL
    codec: str = "int4-g64"  # the Redis tier's codec in the TTFT run: the one sized for the 3.5x target
    llama3_8b: bool = True
    dataset: str | None = None  # JSON list of {ctxs: [{text}]}; None: ragcache/data/demo.json

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "chunks", "repeats", "codec_repeats", "ttft_repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.codec not in CODECS:
            raise ValueError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")


def run_store_bench(loaded: LoadedModel, options: StoreBenchOptions, progress: Progress = lambda line: None) -> dict:
    load_before = _load_average()
    redis = RedisBench(options.redis_url)
    try:
        summary = _measure(loaded, options, redis, progress)
    finally:
        redis.sweep()
    summary["machine"] = _machine(loaded, load_before)
    summary["targets"] = check_targets(summary)
    return summary


def _measure(loaded: LoadedModel, options: StoreBenchOptions, redis: RedisBench, progress: Progress) -> dict:
    question, texts = source_texts(options.dataset)
    texts = window_texts(loaded.tokenizer, texts, options.chunks, options.chunk_tokens)
    progress(f"computing {len(texts)} real {options.chunk_tokens}-token chunks on {loaded.name}")
    chunks = real_chunks(loaded, texts, options.chunk_tokens)
    codecs = {}
    for name in CODECS:
        progress(f"codec {name} ({options.codec_repeats} passes over {len(chunks)} chunks)")
        codecs[name] = measure_codec(name, chunks, options.codec_repeats)
    ttft_codec = options.codec
    progress(f"tiers ({options.repeats} puts and gets each); redis: {redis.describe()}")
    tiers = measure_tiers(loaded.device, chunks, options.repeats, redis, ttft_codec)
    redis_by_codec = {}
    for name in CODECS if redis.error is None else ():
        progress(f"redis tier with codec {name}")
        redis_by_codec[name] = redis.measure(chunks, options.repeats, name)
    ttft = measure_ttft(loaded, question, texts, redis, ttft_codec, options.ttft_repeats, progress)
    summary = {
        "codecs": codecs,
        "tiers": tiers,
        "ttft_s": {
            name: None if ttft["runs"][name] is None else ttft["runs"][name]["median_s"]
            for name in (*TIER_NAMES, "miss")
        },
        "options": asdict(options),
        "chunk": _describe(chunks[0], loaded.name),
        "redis": {
            "url": options.redis_url,
            "namespace": redis.namespace,
            "available": redis.error is None,
            "error": redis.error,
            "ttft_codec": ttft_codec,
            "timeout_s": REDIS_TIMEOUT_S,
        },
        "redis_by_codec": redis_by_codec,
        "ttft": ttft,
    }
    if options.llama3_8b:
        progress(f"Llama-3-8B-sized chunk {tuple(LLAMA3_8B)} float16 (random): tiers, then codec speeds")
        big = [random_chunk(LLAMA3_8B, torch.float16, loaded.device)]
        summary["chunk_llama3_8b"] = _describe(big[0], "Llama-3-8B shape, random float16")
        summary["tiers_llama3_8b"] = measure_tiers(loaded.device, big, options.repeats, redis, ttft_codec)
        summary["codecs_llama3_8b"] = {name: measure_codec(name, big, 1) for name in CODECS}
    return summary


# chunks


def source_texts(dataset: str | None) -> tuple[str, list[str]]:
    """A question and the passages to cut chunks from: the demo's, or every ctx of a dataset."""
    if dataset is None:
        data = json.loads(resources.files("ragcache").joinpath("data/demo.json").read_text())
        return data["question"], list(data["documents"])
    rows = json.loads(Path(dataset).read_text())
    return rows[0]["question"], [ctx["text"] for row in rows for ctx in row["ctxs"]]


def window_texts(tokenizer, texts: list[str], count: int, tokens: int) -> list[str]:
    """count distinct texts of a little over `tokens` tokens each, cut from the passages' token stream.

    Windows run back to back while the stream lasts; a shorter stream (the demo's) is read as a
    ring from evenly spaced starts, so the windows still differ."""
    stream = tokenizer.encode(" ".join(text.strip() for text in texts), add_special_tokens=False)
    width = tokens + 8  # re-encoding a decoded window can merge a few tokens
    step = width if count * width <= len(stream) else max(1, len(stream) // count)
    ring = stream * (width // len(stream) + 2)
    return [tokenizer.decode(ring[i * step : i * step + width]) for i in range(count)]


def real_chunks(loaded: LoadedModel, texts: list[str], tokens: int) -> list[KVChunk]:
    """Each text's chunk KV as the engine computes and stores it, cut to exactly `tokens` tokens."""
    store = TieredStore([GpuTier(MEMORY_TIER_BYTES, loaded.device)])
    engine = BlendEngine(loaded, store)
    chunks = []
    try:
        for info in engine.add_documents(texts):
            chunk = store.get(info.key)
            assert chunk is not None  # just stored, in a tier far bigger than these chunks
            chunks.append(chunk)
    finally:
        engine.close()
    return [
        KVChunk(
            c.token_ids[:tokens],
            c.keys[:, :, :tokens].contiguous(),
            c.values[:, :, :tokens].contiguous(),
            c.model_fingerprint,
            c.start_pos,
        )
        for c in chunks
    ]


def random_chunk(shape: ChunkShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> KVChunk:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(*shape, generator=generator).to(device, dtype)  # (layers, kv_heads, tokens, head_dim)
    values = torch.randn(*shape, generator=generator).to(device, dtype)
    return KVChunk(tuple(range(shape.tokens)), keys, values, "llama3-8b-shaped")


# codecs and tiers


def measure_codec(name: str, chunks: list[KVChunk], passes: int) -> dict:
    """Size against float16, and MB/s at the median encode and decode: robust to bursts of other load."""
    encoded_bytes, encode_s, decode_s = 0, [], []
    for _ in range(passes):
        for chunk in chunks:
            start = time.perf_counter()
            blob = encode_chunk(chunk, name)
            encode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            decode_chunk(blob)
            decode_s.append(time.perf_counter() - start)
            encoded_bytes += len(blob)
    kv_bytes = sum(chunk.nbytes for chunk in chunks) * passes
    fp16_bytes = kv_bytes // chunks[0].keys.element_size() * 2
    mean_mb = kv_bytes / len(encode_s) / 1e6
    return {
        "ratio_vs_fp16": fp16_bytes / encoded_bytes,
        "encode_mb_s": mean_mb / statistics.median(encode_s),
        "decode_mb_s": mean_mb / statistics.median(decode_s),
        "encoded_bytes": encoded_bytes // len(encode_s),
    }


def measure_tier(tier, chunks: list[KVChunk], repeats: int) -> dict | None:
    """put, get and delete one chunk at a time; None if the tier refused a put or missed a get."""
    put_s, get_s, kv_bytes = [], [], 0
    sync = torch.cuda.synchronize if chunks[0].keys.is_cuda else (lambda: None)
    for i in range(repeats):
        chunk, key = chunks[i % len(chunks)], ChunkKey(f"bench-store-{i}")
        start = time.perf_counter()
        stored = tier.put(key, chunk)
        sync()
        put_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        found = tier.get(key)
        sync()
        get_s.append(time.perf_counter() - start)
        tier.delete(key)
        if not stored or found is None:
            return None
        kv_bytes += chunk.nbytes
    return {
        "put_mb_s": kv_bytes / sum(put_s) / 1e6,
        "get_mb_s": kv_bytes / sum(get_s) / 1e6,
        "get_p50_ms": percentile(get_s, 50) * 1e3,
        "get_p99_ms": percentile(get_s, 99) * 1e3,
    }


def measure_tiers(device: torch.device, chunks: list[KVChunk], repeats: int, redis: RedisBench, codec: str) -> dict:
    return {
        "device": measure_tier(GpuTier(MEMORY_TIER_BYTES, device), chunks, repeats),
        "cpu": measure_tier(CpuTier(MEMORY_TIER_BYTES), chunks, repeats),
        "redis": redis.measure(chunks, repeats, codec),
    }


class RedisBench:
    """Redis tiers under one fresh namespace, through RedisTier's public API only; sweep() deletes
    whatever is left there. error: why Redis cannot be used (its rows are then None)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.namespace = f"bench-store-{uuid.uuid4().hex[:12]}"
        self.error = "no --redis-url" if url is None else None
        if url is not None:
            probe, key = self.tier("raw"), ChunkKey("probe")
            if not probe.put(key, KVChunk((0,), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), "probe")):
                self.error = f"Redis at {url} is not usable: {probe.stats().last_error or 'put refused'}"
            self._empty(probe)

    def describe(self) -> str:
        return self.error or f"{self.url}, namespace {self.namespace}"

    def tier(self, codec: str, fingerprint: str | None = None):
        from ragcache.storage.redis import RedisTier

        assert self.url is not None  # only called when there is a URL: error is set when there is none
        return RedisTier(
            self.url, namespace=self.namespace, codec=codec, model_fingerprint=fingerprint, timeout_s=REDIS_TIMEOUT_S
        )

    def measure(self, chunks: list[KVChunk], repeats: int, codec: str) -> dict | None:
        if self.error is not None:
            return None
        tier = self.tier(codec)
        try:
            return measure_tier(tier, chunks, repeats)
        finally:
            self._empty(tier)

    def sweep(self) -> None:
        if self.error is None:
            self._empty(self.tier("raw"))

    @staticmethod
    def _empty(tier) -> None:
        for key in tier.keys():
            tier.delete(key)
        tier.close()


# time to first token


def measure_ttft(
    loaded: LoadedModel,
    question: str,
    texts: list[str],
    redis: RedisBench,
    codec: str,
    repeats: int,
    progress: Progress,
) -> dict:
    """Median TTFT of one reuse-mode request with its prefix and chunks only in each tier, and with none cached.

    The Redis tier reads whatever codec wrote an entry (the codec is in its header), so the entries
    are also written through a tier of every other codec to time Redis hits per codec."""
    tiers: dict[str, KVTier] = {"device": GpuTier(MEMORY_TIER_BYTES, loaded.device), "cpu": CpuTier(MEMORY_TIER_BYTES)}
    writers = dict(tiers)
    if redis.error is None:
        tiers["redis"] = writers["redis"] = redis.tier(codec, loaded.fingerprint)
        writers.update({f"redis {name}": redis.tier(name, loaded.fingerprint) for name in CODECS if name != codec})
    store = TieredStore(list(tiers.values()))
    engine = BlendEngine(loaded, store)
    request = RagRequest(
        question, tuple(texts), mode="reuse", sampling=SamplingParams(max_tokens=1), prefix_cache=False
    )
    engine.generate(RagRequest("Warm-up.", sampling=SamplingParams(max_tokens=1)))  # first-call allocations
    keys = [info.key for info in engine.add_documents(list(texts))]
    entries = []
    for key in tiers["device"].keys():  # the documents and the prefix
        chunk = tiers["device"].get(key)
        assert chunk is not None  # listed just now; nothing evicts from a tier this big
        entries.append((key, chunk))
    # a miss's chunks end up in both
    written: list[TieredStore | KVTier] = [store, *([tiers["redis"]] if "redis" in tiers else [])]
    scenarios = [*writers, "miss"]
    runs: dict[str, list[Generation]] = {name: [] for name in scenarios}
    try:
        for round_index in range(repeats):
            progress(f"TTFT round {round_index + 1}/{repeats}: {', '.join(scenarios)}")
            for name in scenarios:
                store.flush()
                if name != "miss":
                    writers[name].put_many(entries)
                runs[name].append(engine.generate(request))
                if name == "miss":  # the engine stores the computed chunks off-thread; let it finish
                    _wait_until(lambda: all(t.contains(k) for t in written for k in keys), timeout_s=300)
    finally:
        store.flush()  # before close(), which would write local entries back to Redis
        engine.close()
        for name, writer in writers.items():
            if name.startswith("redis "):
                writer.close()
    summary = {name: _ttft_summary(results) for name, results in runs.items()}
    by_codec = {name: summary.pop(f"redis {name}", summary.get("redis")) for name in CODECS} if "redis" in tiers else {}
    return {
        "documents": len(texts),
        "prompt_tokens": runs["miss"][0].prompt_tokens,
        "codec": codec,
        "kv_mb": sum(chunk.nbytes for _, chunk in entries) / 1e6,
        "runs": {name: summary.get(name) for name in (*TIER_NAMES, "miss")},
        "redis_by_codec": by_codec,
    }


def _ttft_summary(results) -> dict:
    timings = [result.timings for result in results]
    return {
        "median_s": statistics.median(t.ttft_s for t in timings),
        "runs_s": [t.ttft_s for t in timings],
        "lookup_s": statistics.median(t.lookup_s for t in timings),
        "chunk_compute_s": statistics.median(t.chunk_compute_s for t in timings),
        "blend_s": statistics.median(t.blend_s for t in timings),
        "chunk_hits": min(result.chunk_hits for result in results),
    }


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine's store writes did not finish within {timeout_s} s")
        time.sleep(0.01)


# targets, table, plot


def check_targets(summary: dict) -> dict:
    codecs = summary["codecs"]
    best = max(codecs, key=lambda name: codecs[name]["ratio_vs_fp16"])
    ttft = summary["ttft_s"]
    ratio = None if ttft["redis"] is None else ttft["redis"] / ttft["cpu"]
    codec = summary["redis"]["ttft_codec"]
    runs = summary["ttft"]["runs"]
    why = (
        None
        if ratio is None
        else {  # where a Redis hit's extra time goes
            "ttft_gap_s": ttft["redis"] - ttft["cpu"],
            "lookup_gap_s": runs["redis"]["lookup_s"] - runs["cpu"]["lookup_s"],
            "tier_get_estimate_s": summary["ttft"]["kv_mb"] / summary["tiers"]["redis"]["get_mb_s"],
        }
    )
    return {
        "codec_ratio": {
            "target": TARGET_RATIO,
            "codec": best,
            "value": codecs[best]["ratio_vs_fp16"],
            "met": codecs[best]["ratio_vs_fp16"] >= TARGET_RATIO,
        },
        # both targets on one codec: the TTFT run's (a deployment runs one codec)
        "redis_vs_cpu_ttft": {
            "target": TARGET_REDIS_VS_CPU,
            "codec": codec,
            "value": ratio,
            "codec_ratio_vs_fp16": codecs[codec]["ratio_vs_fp16"],
            "met": None if ratio is None else ratio <= TARGET_REDIS_VS_CPU,
            "why": why,
        },
    }


def format_store_table(summary: dict) -> str:
    chunk, machine = summary["chunk"], summary["machine"]
    lines = [
        f"{machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, device {machine['device']}; "
        f"load average {machine['load_average_before']:.2f} before, {machine['load_average_after']:.2f} after",
        f"chunk: {chunk['source']} {tuple(chunk['shape'])} {chunk['dtype']}, {chunk['nbytes'] / 1e6:.2f} MB "
        "(MB/s are MB of KV as held)",
        "",
        f"{'codec':<11} {'x vs fp16':>9} {'encode MB/s':>12} {'decode MB/s':>12}",
    ]
    for name, row in summary["codecs"].items():
        lines.append(f"{name:<11} {row['ratio_vs_fp16']:>9.2f} {row['encode_mb_s']:>12.0f} {row['decode_mb_s']:>12.0f}")
    if "codecs_llama3_8b" in summary:
        big = summary["chunk_llama3_8b"]
        lines += [
            "",
            f"8B-sized chunk {tuple(big['shape'])} {big['dtype']}, {big['nbytes'] / 1e6:.1f} MB, random: "
            "codec speeds only (random data does not compress like KV)",
        ]
        for name, row in summary["codecs_llama3_8b"].items():
            lines.append(f"{name:<11} {'':>9} {row['encode_mb_s']:>12.0f} {row['decode_mb_s']:>12.0f}")
    redis = summary["redis"]
    rows = [(name, row) for name, row in summary["tiers"].items()]
    rows += [(f"redis {name}", row) for name, row in summary["redis_by_codec"].items() if name != redis["ttft_codec"]]
    rows += [(f"8B {name}", row) for name, row in summary.get("tiers_llama3_8b", {}).items()]
    lines += ["", f"{'tier':<18} {'put MB/s':>10} {'get MB/s':>10} {'get p50 ms':>11} {'get p99 ms':>11}"]
    for name, row in rows:
        label = f"{name} ({redis['ttft_codec']})" if name in ("redis", "8B redis") else name
        lines.append(
            f"{label:<18} "
            + (
                "unavailable"
                if row is None
                else f"{row['put_mb_s']:>10.4g} {row['get_mb_s']:>10.4g} {row['get_p50_ms']:>11.3f} {row['get_p99_ms']:>11.3f}"
            )
        )
    if redis["error"]:
        lines.append(f"redis: {redis['error']}")
    ttft = summary["ttft"]
    lines += [
        "",
        f"TTFT, reuse mode, {ttft['documents']} documents, {ttft['prompt_tokens']} prompt tokens, "
        f"{ttft['kv_mb']:.1f} MB of KV (median of {summary['options']['ttft_repeats']})",
        f"{'chunks from':<16} {'TTFT s':>8} {'lookup s':>9} {'compute s':>10} {'admitted':>8} {'hits':>5}",
    ]
    rows = [(f"redis {ttft['codec']}" if name == "redis" else name, row) for name, row in ttft["runs"].items()]
    rows[3:3] = [(f"redis {name}", row) for name, row in ttft["redis_by_codec"].items() if name != ttft["codec"]]
    for label, row in rows:
        lines.append(
            f"{label:<16} "
            + (
                "unavailable"
                if row is None
                else f"{row['median_s']:>8.3f} {row['lookup_s']:>9.3f} {row['chunk_compute_s']:>10.3f} "
                f"{row['blend_s']:>8.3f} {row['chunk_hits']:>5}"
            )
        )
    lines.append("(lookup: store reads at submit; compute: missing chunks; admitted: admission to first token)")
    lines.append("")
    lines += [_target_line(name, target) for name, target in summary["targets"].items()]
    why = summary["targets"]["redis_vs_cpu_ttft"]["why"]
    if why is not None:
        lines.append(
            f"  a Redis hit costs {why['ttft_gap_s']:.3f} s more than a CPU hit: lookups +{why['lookup_gap_s']:.3f} s "
            f"(the tier's get rate predicts {why['tier_get_estimate_s']:.3f} s)"
        )
    return "\n".join(lines)


def _target_line(name: str, target: dict) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
    value = "n/a" if target["value"] is None else f"{target['value']:.2f}x"
    what = {
        "codec_ratio": f"best codec >= {target['target']}x smaller than float16",
        "redis_vs_cpu_ttft": f"Redis-tier hit's TTFT within {target['target']}x of a CPU-tier hit's",
    }[name]
    return f"target: {what}: {value} ({target['codec']}) -> {verdict}"


def plot_store(summary: dict, path: Path) -> None:
    from ragcache.bench.serve_plot import pyplot

    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary["codecs"])
    left.bar(names, [summary["codecs"][n]["ratio_vs_fp16"] for n in names], color="tab:blue")
    left.axhline(TARGET_RATIO, color="tab:red", linestyle="--", label=f"target {TARGET_RATIO}x")
    left.set_ylabel("x smaller than float16")
    left.set_title(f"codecs on real {summary['chunk']['source']} KV")
    left.tick_params(axis="x", rotation=30)
    left.legend()
    scenarios = [n for n, v in summary["ttft_s"].items() if v is not None]
    right.bar(scenarios, [summary["ttft_s"][n] for n in scenarios], color="tab:green")
    right.set_yscale("log")  # a miss recomputes every chunk: far above the hits
    right.set_ylabel("TTFT, s (median, log scale)")
    right.set_title(f"chunks from each tier (redis: {summary['redis']['ttft_codec']})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _describe(chunk: KVChunk, source: str) -> dict:
    return {
        "source": source,
        "shape": list(chunk.keys.shape),
        "dtype": str(chunk.dtype).removeprefix("torch."),
        "nbytes": chunk.nbytes,
        "fp16_bytes": chunk.nbytes // chunk.keys.element_size() * 2,
    }


def _machine(loaded: LoadedModel, load_before: float) -> dict:
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "model_dtype": str(loaded.dtype).removeprefix("torch."),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
