"""The same RAG question over a folder of .txt files, through the official `openai` client.

    ragcache serve                                   # in another shell: http://127.0.0.1:8000
    python examples/rag_openai.py DOCS_DIR "your question" [--url URL] [--api-key KEY] [--no-stream]

ragcache speaks OpenAI's chat completions API at /v1; its own fields ride in `extra_body`
(here the documents, which the server caches by content on first use, so a second run
reuses their KV). The cache report comes back as the `ragcache` extension object:
`completion.model_extra["ragcache"]` on a plain answer, on the last chunk's model_extra
when streaming.
"""

import argparse
from pathlib import Path

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused", help="a tenant key, if the server has keys")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--no-stream", action="store_true", help="ask for the whole answer at once")
    args = parser.parse_args()
    files = [path for path in sorted(args.folder.glob("*.txt")) if path.read_text().strip()]
    documents = [{"id": path.name, "text": path.read_text()} for path in files]
    if not documents:
        parser.error(f"no non-empty .txt files in {args.folder}")

    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    request = dict(model=client.models.list().data[0].id, messages=[{"role": "user", "content": args.question}],
                   max_tokens=args.max_tokens, temperature=0, extra_body={"documents": documents})
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    if args.no_stream:
        completion = client.chat.completions.create(**request)
        print(completion.choices[0].message.content)
        report, usage = completion.model_extra["ragcache"], completion.usage
    else:
        report = usage = None
        for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            report = (chunk.model_extra or {}).get("ragcache") or report
            usage = chunk.usage or usage
        print()
    print(f"\nchunk hits {report['chunk_hits']}/{report['chunk_hits'] + report['chunk_misses']}, "
          f"cached tokens {usage.prompt_tokens_details.cached_tokens}/{usage.prompt_tokens}, "
          f"TTFT {report['timings']['ttft_ms']:.0f} ms")


if __name__ == "__main__":
    main()
