"""Print a running ragcache server's /admin/stats as two compact tables: tiers and tenants.

    python examples/admin_stats.py [--url http://127.0.0.1:8000] [--admin-key KEY]

The admin key is needed only when the server has API keys configured. Fields a tier does
not keep (Redis has no entry count or byte budget of its own) show as "-".
"""

import argparse
import sys

from ragcache.sdk import Client, RagcacheError


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return "-"


def hit_rate(tier: dict) -> str:
    looked_up = tier.get("hits", 0) + tier.get("misses", 0)
    return f"{tier['hits'] / looked_up:.0%}" if looked_up else "-"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", default=None)
    args = parser.parse_args()
    try:
        with Client(args.url, admin_key=args.admin_key) as client:
            stats = client.stats()
    except RagcacheError as exc:
        sys.exit(f"ragcache: {exc}")

    queue = stats["queue"]
    print(f"model {stats['model']}, up {stats['uptime_s']:.0f} s, queue {queue['depth']}/{queue['max']}\n")
    tiers = [[t["name"], t.get("entries", "-"), f"{size(t.get('used_bytes'))} / {size(t.get('max_bytes'))}",
              hit_rate(t), t.get("evictions", "-")] for t in stats["tiers"]]
    print(table(["tier", "entries", "bytes / budget", "hit rate", "evictions"], tiers), end="\n\n")
    tenants = [[name, sum(t["requests"].values()), sum(t["errors"].values()), t["documents"],
                ms(t["ttft_s"].get("p50")), ms(t["ttft_s"].get("p90"))] for name, t in sorted(stats["tenants"].items())]
    print(table(["tenant", "requests", "errors", "documents", "TTFT p50", "TTFT p90"], tenants))


if __name__ == "__main__":
    main()
