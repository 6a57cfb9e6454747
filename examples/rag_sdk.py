"""Answer a question over a folder of .txt files through a running ragcache server, with the SDK.

    ragcache serve                                   # in another shell: http://127.0.0.1:8000
    python examples/rag_sdk.py DOCS_DIR "your question" [--url URL] [--api-key KEY] [--ratio 0.15]

Each file becomes one document whose id is its file name. Adding them computes and
stores their KV once; a second run finds them already cached. The answer is streamed
from /v1/chat/completions with the documents named by id, and the cache report follows:
documents served from cache, prompt tokens whose KV was reused, time to first token.
"""

import argparse
import sys
from pathlib import Path

from ragcache.sdk import Client, RagcacheError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--ratio", type=float, default=None, help="blend ratio (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    files = [path for path in sorted(args.folder.glob("*.txt")) if path.read_text().strip()]
    if not files:
        parser.error(f"no non-empty .txt files in {args.folder}")

    with Client(args.url, args.api_key) as client:
        try:
            answer(client, files, args)
        except RagcacheError as exc:
            sys.exit(f"ragcache: {exc} (is `ragcache serve` running at {args.url}?)")


def answer(client: Client, files: list[Path], args: argparse.Namespace) -> None:
    records = client.add_documents([(path.name, path.read_text()) for path in files])
    for record in records:
        print(f"{record.id}: {record.num_tokens} tokens, {'already cached' if record.cached else 'KV computed'}")
    options = {} if args.ratio is None else {"blend_ratio": args.ratio}
    print(f"\nQ: {args.question}\nA: ", end="", flush=True)
    with client.chat(args.question, document_ids=[r.id for r in records], stream=True,
                     max_tokens=args.max_tokens, temperature=0.0, **options) as stream:
        for piece in stream:
            print(piece, end="", flush=True)
    report, usage = stream.report, stream.usage
    print(f"\n\nchunk hits {report.chunk_hits}/{report.chunk_hits + report.chunk_misses}, "
          f"cached tokens {report.cached_tokens}/{usage.prompt_tokens} (recomputed {report.recomputed_tokens}), "
          f"TTFT {report.timings.ttft_ms:.0f} ms, mode {report.mode} r={report.blend_ratio:g}")


if __name__ == "__main__":
    main()
