"""`ragcache` command line: demo (the main job), bench rag."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ragcache.config import SettingsError
from ragcache.engine.blend import DEVIATIONS
from ragcache.engine.errors import InvalidRequestError, ModelLoadError


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device-cache-gb", type=float, default=1.0, help="budget of the model device's KV tier, GiB")
    parser.add_argument("--cpu-cache-gb", type=float, default=8.0, help="budget of the CPU KV tier, GiB")
    parser.add_argument("--redis-url", default=None, help="add a Redis tier, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--codec", default="raw", help="codec of the Redis tier: raw, int8, int4, int4-g64, with optional +zlib"
    )
    parser.add_argument("--eviction", default="cost_aware", choices=["lru", "lfu", "cost_aware"])
    parser.add_argument("--check-layer", type=int, default=1, help="layer whose KV deviation picks the tokens")
    parser.add_argument("--deviation", default="value", choices=list(DEVIATIONS), help="what ranks tokens")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="answer a question over embedded documents, with and without KV reuse")
    _add_model_args(demo)
    demo.add_argument("--ratio", type=float, default=0.15, help="blend ratio r")
    export = commands.add_parser("export-model", help="write the model as a safetensors folder vLLM can serve")
    export.add_argument("dir", help="a new (or empty) folder to write config.json, *.safetensors and the tokenizer to")
    export.add_argument("--model", default=None, help="a model directory or .gguf file (default: SmolLM2-135M)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench = commands.add_parser("bench", help="benchmarks")
    suites = bench.add_subparsers(dest="suite", required=True)
    rag = suites.add_parser("rag", help="TTFT and fidelity of full / prefix / reuse / blend@r")
    rag.add_argument("dataset", type=Path, help="JSON list of {question, answers, ctxs: [{text}]}")
    rag.add_argument("--limit", type=int, default=None, help="first N questions")
    rag.add_argument("--docs", type=int, default=None, help="each question's first K passages")
    rag.add_argument("--ratios", type=_ratios, default=(0.05, 0.15, 0.3), help="blend ratios, e.g. 0.05,0.15,0.3")
    rag.add_argument("--max-tokens", type=int, default=32)
    rag.add_argument("--json", type=Path, default=None, help="write the summary here")
    rag.add_argument("--roundtrip-codec", default=None, help="serve cached KV as it comes back through this codec")
    rag.add_argument(
        "--kinds",
        default=None,
        help="time to first token per prompt kind instead of the mode comparison: cold,reordered,repeat,followup,"
        "cross_replica",
    )
    rag.add_argument("--engine", default="own", help="with --kinds: own, vllm or own,vllm")
    rag.add_argument("--kind-modes", default="full,blend@0.15", help="with --kinds: the own engine's modes")
    rag.add_argument(
        "--vllm-url", dest="vllm_urls", default=None, help="with --engine vllm: vLLM server(s); two for cross_replica"
    )
    rag.add_argument(
        "--selections",
        default="default",
        help="blend selections per ratio: default, value, key, attention, epic<k>, <deviation>+epic<k>",
    )
    rag.add_argument(
        "--gate",
        action="store_true",
        help="blend under an error budget: learn on --learn-from with shadow checks, then run DATASET",
    )
    rag.add_argument("--learn-from", type=Path, default=None, help="with --gate: the questions the budget learns on")
    rag.add_argument("--epsilon", type=float, default=0.1, help="with --gate: largest first-token disagreement rate")
    rag.add_argument(
        "--ladder",
        default=None,
        help="with --gate: settings fastest to safest, e.g. blend@0.15,blend@0.3,blend@0.3/attention,prefix",
    )
    rag.add_argument(
        "--shadow-fraction", type=float, default=1.0, help="with --gate: share of learning answers checked"
    )
    _add_model_args(rag)
    serve = commands.add_parser("serve", help="run the HTTP service (settings: --config, RAGCACHE_*, flags)")
    serve.add_argument("--config", type=Path, default=None, help="TOML file of settings")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--model", default=None, help="model directory or .gguf file")
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--redis-url", default=None)
    serve.add_argument("--data-dir", default=None, help="folder of the embedded (sqlite) registry")
    serve.add_argument("--registry", default=None, choices=["auto", "redis", "sqlite", "memory"])
    serve.add_argument(
        "--engine",
        default=None,
        choices=["own", "vllm"],
        help="own: ragcache's engine; vllm: vLLM servers at --vllm-url",
    )
    serve.add_argument(
        "--vllm-url", dest="vllm_urls", default=None, help="vLLM OpenAI server URL(s), comma-separated (--engine vllm)"
    )
    sem = suites.add_parser("semantic", help="semantic cache on fow-cache's labelled pairs, and lookup latency")
    sem.add_argument("--datasets", default="questions,conversations")
    sem.add_argument("--sizes", default="1000,10000,100000", help="index sizes for the latency runs ('' skips them)")
    sem.add_argument("--indexes", default="hnsw,faiss")
    sem.add_argument("--no-unguarded", action="store_true", help="skip the run with the guards off")
    sem.add_argument(
        "--delta",
        default="0.01,0.05,0.1",
        help="learned thresholds at these error bounds, learned on the tuning half ('' skips them)",
    )
    sem.add_argument("--plot", type=Path, default=None, help="write served vs wrong per configuration here (PNG)")
    sem.add_argument(
        "--agreement",
        type=int,
        default=0,
        help="also answer N held-out pairs with the model and score the shadow check's answer agreement",
    )
    _add_model_args(sem)
    sem.add_argument("--json", type=Path, default=None, help="write the summary here")
    replay = suites.add_parser("eviction", help="eviction policies replayed on a RAG retrieval trace")
    replay.add_argument("--documents", type=int, default=2000)
    replay.add_argument("--requests", type=int, default=5000)
    replay.add_argument("--budget-share", type=float, default=0.1, help="tier budget as a share of the corpus KV")
    replay.add_argument("--json", type=Path, default=None, help="write the summary here")
    store = suites.add_parser("store", help="codecs (size, speed), tiers (throughput, latency) and TTFT per tier")
    store.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="'' skips the Redis rows")
    store.add_argument("--codec", default="int4-g64", help="the Redis tier's codec in the TTFT run")
    store.add_argument("--repeats", type=int, default=30, help="puts and gets per tier and chunk size")
    store.add_argument("--codec-repeats", type=int, default=3, help="passes over the chunks per codec")
    store.add_argument("--ttft-repeats", type=int, default=5, help="requests per tier (the median is reported)")
    store.add_argument("--chunks", type=int, default=6, help="distinct real chunks; the RAG request's documents")
    store.add_argument("--chunk-tokens", type=int, default=512)
    store.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="passages to cut chunks from, JSON list of {ctxs: [{text}]} (default: the demo's)",
    )
    store.add_argument("--no-llama3-8b", action="store_true", help="skip the Llama-3-8B-sized chunk")
    store.add_argument("--model", default=None, help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    store.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    store.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    store.add_argument("--json", type=Path, default=None, help="write the summary here")
    store.add_argument("--plot", type=Path, default=None, help="write codec ratios and TTFT per tier (PNG)")
    serve_bench = suites.add_parser("serve", help="the HTTP service under load per mode, beside llama.cpp's server")
    serve_bench.add_argument("dataset", type=Path, help="JSON list of {question, answers, ctxs: [{text}]}")
    serve_bench.add_argument("--limit", type=int, default=None, help="first N questions")
    serve_bench.add_argument("--docs", type=int, default=6, help="each question's first K passages")
    serve_bench.add_argument("--max-tokens", type=int, default=128)
    serve_bench.add_argument("--modes", default="full,prefix,blend@0.15", help="full, prefix, reuse, blend@r")
    serve_bench.add_argument("--concurrency", default="1,4,8", help="closed-loop levels ('' skips the closed loop)")
    serve_bench.add_argument("--rates", default="0.2,0.5", help="open-loop Poisson rates, requests/s ('' skips)")
    serve_bench.add_argument("--requests", type=int, default=None, help="per level (default: max(2 x C, 8); 8 open)")
    serve_bench.add_argument("--duration-s", type=float, default=None, help="no request starts later into a level")
    serve_bench.add_argument("--seed", type=int, default=0, help="question order and arrival gaps")
    serve_bench.add_argument("--url", default=None, help="a running ragcache (default: start `ragcache serve`)")
    serve_bench.add_argument("--api-key", default=None)
    serve_bench.add_argument(
        "--model", default=None, help="model directory or .gguf of the started server (a .gguf is the peer's too)"
    )
    serve_bench.add_argument("--device", default=None)
    serve_bench.add_argument("--dtype", default=None)
    serve_bench.add_argument("--redis-url", default=None)
    serve_bench.add_argument(
        "--peer",
        default="auto",
        choices=["auto", "llamacpp", "vllm", "none"],
        help="llama.cpp's server on the same GGUF (auto: when llama-cpp-python is installed), or vLLM at --vllm-url",
    )
    serve_bench.add_argument(
        "--engine",
        default="own",
        choices=["own", "vllm"],
        help="vllm: also measure `ragcache serve --engine vllm` in front of --vllm-url",
    )
    serve_bench.add_argument(
        "--vllm-url",
        dest="vllm_urls",
        default=None,
        help="running vLLM server(s), comma-separated (scripts/vllm-serve.sh)",
    )
    serve_bench.add_argument("--peer-url", default=None, help="a running llama.cpp server (default: start one)")
    serve_bench.add_argument("--peer-model", default=None, help="the peer's GGUF (default: --model's, or the default)")
    serve_bench.add_argument("--peer-threads", type=int, default=None, help="llama.cpp threads (default: torch's)")
    serve_bench.add_argument("--start-timeout-s", type=float, default=300.0, help="wait this long for a started server")
    serve_bench.add_argument("--json", type=Path, default=None, help="write the summary here")
    serve_bench.add_argument("--plot", type=Path, default=None, help="write TTFT and throughput against load (PNG)")
    agents = suites.add_parser(
        "agents",
        help="agent KV pins (LRU, fixed 2 s, tool TTL) on BFCL multi-turn traces, or TTFT per turn of RAG chats",
        description="--workload agents (default): every pin policy --repeats times on BFCL multi-turn programs, "
        "re-prefilled tokens and job completion time with 95% intervals over the repeats. --workload chat: "
        "multi-turn chats over MuSiQue passages (no tools, no pins), time to first token per turn index.",
    )
    agents.add_argument(
        "--workload", default="agents", choices=["agents", "chat"], help="BFCL tool-calling programs, or RAG chats"
    )
    agents.add_argument(
        "--programs", type=int, default=12, help="BFCL multi-turn entries, one program each (chat: chats)"
    )
    agents.add_argument(
        "--turns",
        type=int,
        default=None,
        help="cap each program at its first N user turns (default: all its trace has; chat: 4 questions per chat)",
    )
    agents.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of every policy, each repeat with its own tool durations and arrivals (95%% intervals over them)",
    )
    agents.add_argument("--arrival-rate", type=float, default=1.0, help="Poisson program arrivals per second")
    agents.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiplies tool durations, think time and the pins' time constants",
    )
    agents.add_argument(
        "--kv-budget-mb",
        type=float,
        default=None,
        help="local KV (device + host tier, half each; default: half of all programs' final KV)",
    )
    agents.add_argument("--max-tokens", type=int, default=64, help="per tool-call request")
    agents.add_argument("--seed", type=int, default=0, help="which programs; repeat r's durations and arrivals")
    agents.add_argument("--no-prefix-runs", action="store_true", help="skip the runs without program_id")
    agents.add_argument("--documents", type=int, default=6, help="chat: MuSiQue passages per chat")
    agents.add_argument(
        "--dataset", default=None, help="chat: MuSiQue JSON (default: /work/shared/data/musique_dev.json)"
    )
    agents.add_argument("--json", type=Path, default=None, help="write the summary here")
    agents.add_argument("--plot", type=Path, default=None, help="write job completion time per policy (PNG; agents)")
    return parser


def _engine(args):
    from ragcache.engine.blend import BlendConfig
    from ragcache.engine.loader import ModelSpec, load_model
    from ragcache.engine.runner import BlendEngine, EngineConfig
    from ragcache.storage.factory import GiB, StoreConfig, make_store

    config = EngineConfig(blend=BlendConfig(args.check_layer, args.deviation))
    store_config = StoreConfig(
        device_max_bytes=int(args.device_cache_gb * GiB),
        cpu_max_bytes=int(args.cpu_cache_gb * GiB),
        redis_url=args.redis_url,
        redis_codec=args.codec,
        eviction=args.eviction,
    )
    loaded = load_model(ModelSpec(args.model, args.device, args.dtype))
    return BlendEngine(loaded, make_store(store_config, args.device, loaded.fingerprint), config)


def _demo(args) -> None:
    from ragcache.demo import format_demo, run_demo

    engine = _engine(args)
    full, blended = run_demo(engine, args.ratio)
    print(format_demo(full, blended, args.ratio))


def _export_model(args) -> None:
    from ragcache.engine.export import export_model

    exported = export_model(args.dir, args.model, args.dtype)
    print(
        f"exported {exported.name} ({exported.num_parameters / 1e6:.1f} M parameters, "
        f"{exported.num_bytes / 2**20:.0f} MiB of safetensors) to {exported.folder}"
    )


def _bench_rag(args) -> None:
    from ragcache.bench.rag import BenchOptions, format_table, load_examples, run_rag_bench

    selections = tuple(name.strip() for name in args.selections.split(",") if name.strip())
    options = BenchOptions(args.limit, args.docs, args.ratios, args.max_tokens, args.roundtrip_codec, selections)
    gate = _gate_options(args)
    examples = load_examples(args.dataset, options)
    if args.kinds is not None:
        summary = _prompt_kinds(args, examples)
    elif gate is None:
        summary = run_rag_bench(_engine(args), examples, options)
        print(format_table(summary))
    else:
        from ragcache.bench.gate import format_gate, run_gate_bench

        summary = run_gate_bench(_engine(args), examples, options, gate)
        print(format_table(summary | {"codec": {"name": "none", "compression_ratio": None}}))
        print(format_gate(summary))
    _write_json(args.json, summary)


def _prompt_kinds(args, examples) -> dict:
    from dataclasses import replace

    from ragcache.bench.prompt_kinds import Engine as PromptKindsEngine
    from ragcache.bench.prompt_kinds import format_kinds_table, parse_kinds, run_prompt_kinds
    from ragcache.bench.rag import request_for

    kinds = parse_kinds(args.kinds)
    names = [name.strip() for name in args.engine.split(",") if name.strip()]
    if not names or any(name not in ("own", "vllm") for name in names):
        raise ValueError(f"--engine: own, vllm or own,vllm, got {args.engine!r}")
    urls = [url.strip() for url in (args.vllm_urls or "").split(",") if url.strip()]
    if ("vllm" in names or "cross_replica" in kinds) and not urls:
        raise ValueError("--engine vllm and --kinds cross_replica need --vllm-url (scripts/vllm-serve.sh starts one)")
    if "cross_replica" in kinds and len(urls) < 2:
        raise ValueError("--kinds cross_replica needs two vLLM servers with RagcacheConnector: --vllm-url A,B")
    engines: dict = {}
    if "own" in names:
        engine = _engine(args)
        engine.generate(replace(request_for(examples[0], "full", 2), namespace="warm-up"))  # not timed

        def register(namespace: str, example) -> None:  # the question's documents, as a warm deployment has them
            engine.add_documents(list(example.documents), namespace=namespace)

        modes = [mode.strip() for mode in args.kind_modes.split(",") if mode.strip()]
        engines["ragcache"] = PromptKindsEngine(engine.generate, modes, register, engine.prefix_stats)
    vllm = [_vllm_engine(args, [url]) for url in urls[:2]]
    if "vllm" in names:
        engines["vllm"] = PromptKindsEngine(vllm[0].generate, ["full"])
    replicas = (vllm[0].generate, vllm[1].generate) if len(vllm) == 2 else None
    summary = run_prompt_kinds(engines, examples, kinds, args.max_tokens, replicas)
    summary["machine"] = {"engines": names, "vllm_urls": urls}
    print(format_kinds_table(summary))
    return summary


def _vllm_engine(args, urls: list[str]):
    from ragcache.storage.cpu import CpuTier
    from ragcache.storage.tiered import TieredStore
    from ragcache.vllm.engine import make_vllm_engine

    engine = make_vllm_engine(urls, args.model, TieredStore([CpuTier(64 << 20)]))
    engine.start()
    return engine


def _gate_options(args):
    """--gate's options, checked before the model loads; None without --gate."""
    if not args.gate:
        if args.learn_from is not None:
            raise ValueError("--learn-from needs --gate")
        return None
    from ragcache.bench.gate import GateOptions
    from ragcache.checks.blend_budget import BlendBudgetConfig

    if args.learn_from is None:
        raise ValueError("--gate needs --learn-from DEV.json (the questions the budget learns on)")
    if not 0.0 <= args.shadow_fraction <= 1.0:
        raise ValueError(f"--shadow-fraction must be in [0, 1], got {args.shadow_fraction}")
    ladder = tuple(name.strip() for name in args.ladder.split(",") if name.strip()) if args.ladder else None
    gate = GateOptions(args.learn_from, args.epsilon, ladder, args.shadow_fraction)
    BlendBudgetConfig(args.epsilon, ladder=ladder or ("prefix",))  # epsilon and ladder names, by name
    return gate


def _bench_eviction(args) -> None:
    from ragcache.bench.eviction import TraceOptions, format_eviction_table, run_eviction_bench

    if args.documents < 6 or args.requests <= 0 or not 0 < args.budget_share <= 1:
        raise ValueError("--documents must be >= 6, --requests positive, --budget-share in (0, 1]")
    summary = run_eviction_bench(TraceOptions(args.documents, args.requests, budget_share=args.budget_share))
    print(format_eviction_table(summary))
    _write_json(args.json, summary)


def _bench_store(args) -> None:
    from ragcache.bench.store import StoreBenchOptions, format_store_table, plot_store, run_store_bench
    from ragcache.engine.loader import ModelSpec, load_model

    options = StoreBenchOptions(
        chunk_tokens=args.chunk_tokens,
        chunks=args.chunks,
        repeats=args.repeats,
        codec_repeats=args.codec_repeats,
        ttft_repeats=args.ttft_repeats,
        redis_url=args.redis_url or None,
        codec=args.codec,
        llama3_8b=not args.no_llama3_8b,
        dataset=None if args.dataset is None else str(args.dataset),
    )
    if args.plot is not None:
        from ragcache.bench.serve_plot import pyplot

        pyplot()  # missing matplotlib stops the bench before it runs, not after
    loaded = load_model(ModelSpec(args.model, args.device, args.dtype))
    summary = run_store_bench(loaded, options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_store_table(summary))
    _write_json(args.json, summary)
    if args.plot is not None:
        plot_store(summary, args.plot)
        print(f"wrote {args.plot}")


def _bench_semantic(args) -> None:
    from ragcache.bench.semantic import SemanticBenchOptions, format_semantic_table, run_semantic_bench

    def names(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    options = SemanticBenchOptions(
        datasets=names(args.datasets),
        compare_unguarded=not args.no_unguarded,
        sizes=tuple(int(n) for n in names(args.sizes)),
        indexes=names(args.indexes),
        deltas=tuple(float(d) for d in names(args.delta)),
    )
    if args.plot is not None:
        import matplotlib  # noqa: F401  (missing matplotlib stops the bench before it runs, not after)
    if args.agreement < 0:
        raise ValueError(f"--agreement must be >= 0, got {args.agreement}")
    summary = run_semantic_bench(options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.agreement:
        from ragcache.bench.agreement import measure_agreement
        from ragcache.semantic.embedder import SentenceTransformerEmbedder

        summary["agreement"] = measure_agreement(_engine(args), SentenceTransformerEmbedder(), args.agreement)
        print(
            f"answer agreement on {summary['agreement']['pairs']} held-out pairs: should-hit "
            f"{summary['agreement']['same_meaning_agree']:.1%} agree, traps {summary['agreement']['trap_agree']:.1%}"
        )
    print(format_semantic_table(summary))
    _write_json(args.json, summary)
    if args.plot is not None:
        from ragcache.bench.semantic_verifiers import plot_verifiers

        plot_verifiers(summary, args.plot)
        print(f"wrote {args.plot}")


def _bench_serve(args) -> None:
    from ragcache.bench.rag import BenchOptions, load_examples
    from ragcache.bench.serve import ServeBenchOptions, format_serve_table, parse_list, run_serve_bench
    from ragcache.bench.serve_targets import ServerOptions

    options = ServeBenchOptions(
        limit=args.limit,
        docs=args.docs,
        max_tokens=args.max_tokens,
        modes=parse_list(args.modes, str, "--modes"),
        concurrency=parse_list(args.concurrency, int, "--concurrency"),
        rates=parse_list(args.rates, float, "--rates"),
        requests=args.requests,
        duration_s=args.duration_s,
        seed=args.seed,
    )
    server_flags = (
        "url",
        "api_key",
        "model",
        "device",
        "dtype",
        "redis_url",
        "peer",
        "peer_url",
        "peer_model",
        "peer_threads",
        "start_timeout_s",
        "engine",
        "vllm_urls",
    )
    servers = ServerOptions(**{name: getattr(args, name) for name in server_flags})
    if args.plot is not None:
        from ragcache.bench.serve_plot import plot_serve_summary, pyplot

        pyplot()  # missing matplotlib stops the bench before it runs, not after
    examples = load_examples(args.dataset, BenchOptions(options.limit, options.docs))
    summary = run_serve_bench(examples, options, servers, str(args.dataset))
    print(format_serve_table(summary))
    _write_json(args.json, summary)
    if args.plot is not None:
        plot_serve_summary(summary, args.plot)
        print(f"wrote {args.plot}")


def _bench_agents(args) -> None:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.workload == "chat":
        from ragcache.bench.chat import CHAT_TURNS, DEFAULT_DATASET, ChatBenchOptions, format_chat_table, run_chat_bench

        if args.plot is not None:
            raise ValueError("--plot draws the agents workload only")
        chat = ChatBenchOptions(
            chats=args.programs,
            turns=CHAT_TURNS if args.turns is None else args.turns,
            documents=args.documents,
            repeats=args.repeats,
            arrival_rate=args.arrival_rate,
            time_scale=args.time_scale,
            kv_budget_mb=args.kv_budget_mb,
            seed=args.seed,
            dataset=args.dataset or DEFAULT_DATASET,
        )
        summary = run_chat_bench(chat, progress)
        print(format_chat_table(summary))
        _write_json(args.json, summary)
        return
    from ragcache.bench.agents import AgentsBenchOptions, format_agents_table, plot_agents, run_agents_bench

    options = AgentsBenchOptions(
        programs=args.programs,
        turns=args.turns,
        repeats=args.repeats,
        arrival_rate=args.arrival_rate,
        time_scale=args.time_scale,
        kv_budget_mb=args.kv_budget_mb,
        max_tokens=args.max_tokens,
        seed=args.seed,
        prefix_runs=not args.no_prefix_runs,
    )
    if args.plot is not None:
        from ragcache.bench.serve_plot import pyplot

        pyplot()  # missing matplotlib stops the bench before it runs, not after
    summary = run_agents_bench(options, progress)
    print(format_agents_table(summary))
    _write_json(args.json, summary)
    if args.plot is not None:
        plot_agents(summary, args.plot)
        print(f"wrote {args.plot}")


def _write_json(path: Path | None, summary: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {path}")


def _serve(args) -> None:
    import logging
    import os

    from ragcache.config import load_settings
    from ragcache.service.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "model",
            "device",
            "dtype",
            "redis_url",
            "data_dir",
            "registry",
            "engine",
            "vllm_urls",
        )
    }
    serve(load_settings(args.config, os.environ, flags))


COMMANDS = {
    ("serve", None): _serve,
    ("demo", None): _demo,
    ("export-model", None): _export_model,
    ("bench", "rag"): _bench_rag,
    ("bench", "eviction"): _bench_eviction,
    ("bench", "store"): _bench_store,
    ("bench", "semantic"): _bench_semantic,
    ("bench", "serve"): _bench_serve,
    ("bench", "agents"): _bench_agents,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[(args.command, getattr(args, "suite", None))](args)
    except (ModelLoadError, InvalidRequestError, SettingsError, ValueError) as exc:
        print(f"ragcache: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
