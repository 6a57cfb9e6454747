"""Prometheus text exposition of Runtime.stats(), in the project's vocabulary (tier, tenant, mode)."""

from __future__ import annotations


def _line(name: str, value: float, **labels: str) -> str:
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}"


def prometheus_text(stats: dict) -> str:
    lines = [
        "# HELP ragcache_queue_depth Requests waiting for or running on the model.",
        "# TYPE ragcache_queue_depth gauge",
        _line("ragcache_queue_depth", stats["queue"]["depth"]),
    ]
    engine = stats["engine"]
    engine_metrics = {
        "running": ("gauge", "Sequences admitted to the batched step loop."),
        "waiting": ("gauge", "Sequences waiting for admission."),
        "swapped": ("gauge", "Preempted sequences whose working KV is in host memory."),
        "working_kv_bytes": ("gauge", "Working KV reserved by running sequences."),
        "max_working_kv_bytes": ("gauge", "Budget of the running sequences' working KV."),
        "tokens_per_step": ("gauge", "Mean tokens (decode + prefill) per batched step."),
        "steps": ("counter", "Batched steps run."),
        "preemptions": ("counter", "Sequences preempted (swapped out) to let another grow."),
        "cancelled": ("counter", "Sequences cancelled because their client went away."),
    }
    for field, (kind, help_text) in engine_metrics.items():
        name = f"ragcache_engine_{field}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", _line(name, engine[field])]
    tier_metrics = {
        "entries": ("gauge", "Chunk caches held by the tier."),
        "used_bytes": ("gauge", "Bytes held by the tier."),
        "max_bytes": ("gauge", "Byte budget of the tier."),
        "hits": ("counter", "Lookups the tier answered."),
        "misses": ("counter", "Lookups the tier could not answer."),
        "evictions": ("counter", "Entries evicted for room."),
        "errors": ("counter", "Failed calls to the tier (Redis faults)."),
        "corrupt": ("counter", "Entries rejected as corrupt or foreign."),
    }
    for field, (kind, help_text) in tier_metrics.items():
        name = f"ragcache_tier_{field}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [_line(name, tier[field], tier=tier["name"]) for tier in stats["tiers"] if field in tier]
    for field in (
        "promotions",
        "demotions",
        "pins",
        "pins_expired",
        "write_through_failures",
        "written_after_retry",
        "backlog_dropped",
    ):
        name = f"ragcache_store_{field}_total"
        lines += [f"# TYPE {name} counter", _line(name, stats["store"][field])]
    for field in ("backlog_entries", "backlog_bytes"):  # remote writes waiting for Redis to come back
        name = f"ragcache_store_{field}"
        lines += [f"# TYPE {name} gauge", _line(name, stats["store"][field])]
    lines += _prefix_lines(stats.get("prefix_cache"))
    registry = stats["registry"]
    lines += [
        "# TYPE ragcache_registry_errors_total counter",
        "# TYPE ragcache_registry_available gauge",
        _line("ragcache_registry_errors_total", registry["errors"], kind=registry["kind"]),
        _line("ragcache_registry_available", int(registry["available"]), kind=registry["kind"]),
    ]
    lines += [
        "# TYPE ragcache_requests_total counter",
        "# TYPE ragcache_errors_total counter",
        "# TYPE ragcache_ttft_seconds summary",
    ]
    for tenant, t in stats["tenants"].items():
        lines += [_line("ragcache_requests_total", n, tenant=tenant, mode=mode) for mode, n in t["requests"].items()]
        lines += [_line("ragcache_errors_total", n, tenant=tenant, type=kind) for kind, n in t["errors"].items()]
        lines += [
            _line("ragcache_ttft_seconds", v, tenant=tenant, quantile=f"0.{q[1:]}") for q, v in t["ttft_s"].items()
        ]
    semantic = {
        "lookups": "counter",
        "hits": "counter",
        "false_hits": "counter",
        "entries": "gauge",
        "threshold": "gauge",
    }
    for field, kind in semantic.items():
        name = f"ragcache_semantic_{field}" + ("_total" if kind == "counter" else "")
        lines.append(f"# TYPE {name} {kind}")
        lines += [_line(name, c[field], tenant=c["tenant"], category=c["category"]) for c in stats.get("semantic", [])]
    for field in ("checks", "checks_wrong", "invalidated_by_document"):
        name = f"ragcache_semantic_{field}_total"
        lines.append(f"# TYPE {name} counter")
        lines += [
            _line(name, c.get(field, 0), tenant=c["tenant"], category=c["category"]) for c in stats.get("semantic", [])
        ]
    learned = {
        "delta": "Largest wrong-answer rate the learned threshold holds.",
        "observations": "Labelled observations the learned threshold is built on.",
        "wrong_rate_low": "Lower end of the served wrong-answer rate's interval.",
        "wrong_rate_high": "Upper end of the served wrong-answer rate's interval.",
    }
    for field, help_text in learned.items():
        name = f"ragcache_semantic_learned_{field}"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [
            _line(name, c["learned"][field], tenant=c["tenant"], category=c["category"])
            for c in stats.get("semantic", [])
            if c.get("learned") and c["learned"].get(field) is not None
        ]
    lines += _blend_budget_lines(stats.get("blend_budget", []), stats.get("shadow"))
    return "\n".join(lines) + "\n"


def _prefix_lines(prefix: dict | None) -> list[str]:
    """The prefix cache's tree: nodes (blocks), cached tokens and bytes, lookups, hit tokens, evictions, pins."""
    if prefix is None:
        return []
    figures = {
        "nodes": ("gauge", "Blocks in the prefix cache's tree."),
        "cached_tokens": ("gauge", "Tokens whose KV the prefix cache's tree holds."),
        "cached_bytes": ("gauge", "Bytes of the blocks in the prefix cache's tree."),
        "pinned_blocks": ("gauge", "Blocks agent pins hold."),
        "lookups": ("counter", "Prompts looked up in the prefix cache."),
        "lookup_tokens": ("counter", "Tokens of the prompts looked up."),
        "hit_tokens": ("counter", "Of them, tokens found (their KV reused)."),
        "evictions": ("counter", "Blocks pruned from the tree: the store no longer held them."),
        "promoted_tokens": ("counter", "Tokens prefetched up to the top tier."),
    }
    lines = []
    for field, (kind, help_text) in figures.items():
        name = f"ragcache_prefix_{field}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", _line(name, prefix[field])]
    return lines


def _blend_budget_lines(budgets: list[dict], shadow: dict | None) -> list[str]:
    """Per (tenant, category, setting): the disagreement estimate, its interval and checks; the rung in force."""
    lines = [
        "# HELP ragcache_blend_budget_epsilon Largest first-token disagreement rate blending may have.",
        "# TYPE ragcache_blend_budget_epsilon gauge",
        "# HELP ragcache_blend_setting Blend setting in force (1) per tenant and category.",
        "# TYPE ragcache_blend_setting gauge",
        "# HELP ragcache_blend_budget_changes_total Setting changes the budget made.",
        "# TYPE ragcache_blend_budget_changes_total counter",
    ]
    estimates = {
        "checks": "Shadow checks in the window.",
        "disagreement": "First-token disagreement rate.",
        "disagreement_low": "Lower end of its interval.",
        "disagreement_high": "Upper end of its interval.",
    }
    for field, help_text in estimates.items():
        lines += [f"# HELP ragcache_blend_{field} {help_text}", f"# TYPE ragcache_blend_{field} gauge"]
    for row in budgets:
        labels = {"tenant": row["tenant"], "category": row["category"]}
        lines.append(_line("ragcache_blend_budget_epsilon", row["epsilon"], **labels))
        lines.append(_line("ragcache_blend_setting", 1, **labels, setting=row["setting"]))
        lines.append(_line("ragcache_blend_budget_changes_total", row["changes"], **labels))
        for setting, estimate in row["estimates"].items():
            values = {
                "checks": estimate["n"],
                "disagreement": estimate["rate"],
                "disagreement_low": estimate["low"],
                "disagreement_high": estimate["high"],
            }
            lines += [
                _line(f"ragcache_blend_{field}", value, **labels, setting=setting)
                for field, value in values.items()
                if value is not None
            ]
    if shadow is not None:
        lines += [
            "# HELP ragcache_shadow_checks_total Shadow checks by outcome.",
            "# TYPE ragcache_shadow_checks_total counter",
        ]
        lines += [_line("ragcache_shadow_checks_total", n, outcome=outcome) for outcome, n in shadow["counts"].items()]
        lines += ["# TYPE ragcache_shadow_pending gauge", _line("ragcache_shadow_pending", shadow["pending"])]
    return lines
