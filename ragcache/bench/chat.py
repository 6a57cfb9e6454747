"""`ragcache bench agents --workload chat`: multi-turn chats over the same documents, time to first token per turn.

A chat is one MuSiQue item's passages (the first --documents of its ctxs, read by bench.rag's
load_examples) and --turns questions over them: the item's own question first, then the questions
of the items after it in the dataset (this MuSiQue file carries no sub-questions: the follow-ups
are other questions asked over the same passages, as prompt_kinds' "followup" asks them). A chat,
per turn:

    POST /v1/chat/completions: the conversation so far (each earlier question followed by a fixed
    answer, the asked item's first gold answer, not the model's, so every run sends the same
    prompts), then the question; the passages as `documents`, re-sent every turn as a RAG chat does
    wait the think time (× --time-scale), then the next question

Chats arrive as a Poisson process (--arrival-rate chats/s) and run interleaved against the agents
bench's in-process server (agents.serve_and_drive: a fresh store and runtime per repeat, the KV
budget as there, pin policy "none": with no tools there is nothing to pin). Each repeat draws its
own arrivals (agents.repeat_seed); the chats and their prompts are the same in every repeat.

Measured per turn index (turn 1: the passages and the first question; turn 2 on: the passages, a
growing history, the next question):

    ttft_p50_s           ragcache.timings.ttft_ms, p50 over every repeat's requests of the turn
    ttft_mean_s          the mean of the per-repeat means (ttft_mean_s_repeats), with its 95%
                         interval (ttft_mean_s_ci, as agents.mean_ci)
    prompt_tokens_mean   usage.prompt_tokens
    cached_tokens_mean   ragcache.prefix_cached_tokens: prompt tokens whose KV came from the
                         server's prefix cache (0 from a server without one)
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from ragcache.bench.agents import (
    BenchAgentsError,
    Sizes,
    check_flags,
    http_client,
    machine_info,
    mean_ci,
    poisson_arrivals,
    post_completion,
    prepare_server,
    prompt_tokens,
    repeat_seed,
    serve_and_drive,
)
from ragcache.bench.metrics import percentile_or_none
from ragcache.bench.rag import BenchOptions, RagExample, load_examples

CHAT_TURNS = 4  # --turns when not given
DEFAULT_DATASET = "/work/shared/data/musique_dev.json"


@dataclass(frozen=True)
class ChatBenchOptions:
    chats: int = 12
    turns: int = CHAT_TURNS
    documents: int = 6  # passages per chat
    repeats: int = 3
    arrival_rate: float = 1.0  # chats/s
    time_scale: float = 1.0  # multiplies the think time
    think_s: float = 1.0  # the user's next question, this long after the answer
    kv_budget_mb: float | None = None  # device + host tier; None: agents.KV_SHARE of all chats' final KV
    answer_tokens: int = 16
    seed: int = 0  # which items, and the arrivals
    dataset: str = DEFAULT_DATASET

    def __post_init__(self) -> None:
        checks = [
            (self.chats >= 1, "--programs", self.chats, "(chats) must be positive"),
            (self.turns >= 1, "--turns", self.turns, "must be positive"),
            (self.documents >= 1, "--documents", self.documents, "must be positive"),
            (self.repeats >= 1, "--repeats", self.repeats, "must be positive"),
            (self.arrival_rate > 0, "--arrival-rate", self.arrival_rate, "must be positive chats/s"),
            (self.time_scale > 0, "--time-scale", self.time_scale, "must be positive"),
            (
                self.kv_budget_mb is None or self.kv_budget_mb > 0,
                "--kv-budget-mb",
                self.kv_budget_mb,
                "must be positive",
            ),
            (self.answer_tokens >= 1, "answer_tokens", self.answer_tokens, "must be positive"),
            (self.think_s >= 0, "think_s", self.think_s, "must be >= 0"),
        ]
        check_flags(checks)


class Chat(NamedTuple):
    id: str  # "musique-<the item's index in the dataset>"
    documents: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]  # the fixed assistant message after each question


class TurnRecord(NamedTuple):
    turn: int  # 1 for a chat's first question
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int  # ragcache.prefix_cached_tokens


def run_chat_bench(options: ChatBenchOptions, progress: Callable[[str], None] = lambda line: None, loaded=None) -> dict:
    """--repeats runs of the chats, each on a fresh server; the JSON-ready summary (loaded: as run_agents_bench)."""
    load_before = os.getloadavg()[0]
    chats = make_chats(load_examples(Path(options.dataset), BenchOptions(docs=options.documents)), options)
    server = prepare_server(
        loaded,
        lambda tokenizer: [
            prompt_tokens(tokenizer, chat_script(chat, options.answer_tokens)[-1]) + options.answer_tokens
            for chat in chats
        ],
        options.kv_budget_mb,
    )
    progress("warm-up: one chat, untimed (the first server's first requests pay one-off costs)")
    serve_and_drive(
        server, "none", options.time_scale, 4, partial(_drive, chats=chats[:1], arrivals_s=[0.0], options=options)
    )
    repeats, started = [], time.perf_counter()
    for repeat in range(options.repeats):
        label = f"repeat {repeat + 1}/{options.repeats}, chat"
        arrivals = poisson_arrivals(len(chats), options.arrival_rate, repeat_seed(options.seed, repeat))
        drive = partial(_drive, chats=chats, arrivals_s=arrivals, options=options, label=label, progress=progress)
        repeats.append(serve_and_drive(server, "none", options.time_scale, 4 * len(chats), drive))
        progress(f"{label}: done")
    summary = chat_summary(repeats, chats, options, server.sizes)
    summary["machine"]["load_average_1m_before"] = load_before
    summary["wall_s"] = time.perf_counter() - started
    return summary


def make_chats(examples: Sequence[RagExample], options: ChatBenchOptions) -> list[Chat]:
    """options.chats items drawn (seeded), each with its own question and the next turns − 1 items' after it."""
    count = len(examples)
    if options.chats > count or options.turns > count:
        raise BenchAgentsError(
            f"{options.dataset} holds {count} questions: --programs ({options.chats}) and --turns ({options.turns}) "
            "must not pass it"
        )
    chosen = random.Random(options.seed).sample(range(count), options.chats)
    asked = [[examples[(index + k) % count] for k in range(options.turns)] for index in chosen]
    return [
        Chat(
            f"musique-{index}",
            examples[index].documents,
            tuple(example.question for example in items),
            tuple(example.answers[0] if example.answers else "I do not know." for example in items),
        )
        for index, items in zip(chosen, asked)
    ]


def chat_script(chat: Chat, answer_tokens: int) -> list[dict]:
    """The request bodies a chat sends, in order: fixed by the chat alone, so every run sends the same."""
    documents = [{"text": text} for text in chat.documents]
    messages: list[dict] = []
    bodies = []
    for question, answer in zip(chat.questions, chat.answers):
        messages.append({"role": "user", "content": question})
        bodies.append(
            {
                "messages": list(messages),
                "documents": documents,
                "max_tokens": answer_tokens,
                "temperature": 0,
                "cache": False,
            }
        )
        messages.append({"role": "assistant", "content": answer})
    return bodies


async def _drive(
    url: str,
    chats: Sequence[Chat],
    arrivals_s: Sequence[float],
    options: ChatBenchOptions,
    label: str = "",
    progress: Callable[[str], None] = lambda line: None,
) -> list[TurnRecord]:
    done = [0]

    async def one(chat: Chat, arrival_s: float) -> list[TurnRecord]:
        await asyncio.sleep(arrival_s)
        records = []
        bodies = chat_script(chat, options.answer_tokens)
        for turn, body in enumerate(bodies, start=1):
            reply = await post_completion(client, url, body)
            report = reply["ragcache"]
            records.append(
                TurnRecord(
                    turn,
                    report["timings"]["ttft_ms"] / 1e3,
                    reply["usage"]["prompt_tokens"],
                    report.get("prefix_cached_tokens", 0),
                )
            )
            if turn < len(bodies):
                await asyncio.sleep(options.think_s * options.time_scale)
        done[0] += 1
        ttfts = " ".join(f"{r.ttft_s:.2f}" for r in records)
        progress(f"{label}: chat {done[0]}/{len(chats)} ({chat.id}) done: TTFT per turn {ttfts} s")
        return records

    async with http_client() as client:
        runs = await asyncio.gather(*(one(chat, at) for chat, at in zip(chats, arrivals_s)))
    return [record for records in runs for record in records]


def chat_summary(
    repeats: Sequence[Sequence[TurnRecord]], chats: Sequence[Chat], options: ChatBenchOptions, sizes: Sizes
) -> dict:
    """The JSON summary: per turn index, TTFT (p50 pooled, mean over repeats with its interval) and tokens."""
    turns = []
    for turn in sorted({record.turn for records in repeats for record in records}):
        pooled = [record for records in repeats for record in records if record.turn == turn]
        means = [statistics.fmean(r.ttft_s for r in records if r.turn == turn) for records in repeats]
        turns.append(
            {
                "turn": turn,
                "requests": len(pooled),
                "ttft_p50_s": percentile_or_none([r.ttft_s for r in pooled], 50),
                "ttft_mean_s": statistics.fmean(means),
                "ttft_mean_s_ci": mean_ci(means),
                "ttft_mean_s_repeats": means,
                "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in pooled),
                "cached_tokens_mean": statistics.fmean(r.cached_tokens for r in pooled),
            }
        )
    return {
        "workload": "chat",
        "turns": turns,
        "config": {
            **asdict(options),
            "device_tier_bytes": sizes.device_bytes,
            "cpu_tier_bytes": sizes.cpu_bytes,
            "expected_kv_bytes": sizes.expected_kv_bytes,
            "chat_ids": [chat.id for chat in chats],
        },
        "machine": machine_info(),
    }


def format_chat_table(summary: dict) -> str:
    config = summary["config"]
    header = f"{'turn':>4} {'requests':>8} {'TTFT p50':>8} {'mean ± 95%':>13} {'prompt':>7} {'cached':>7}"
    lines = [
        f"{config['chats']} MuSiQue chats x {config['turns']} turns over {config['documents']} passages each, "
        f"{config['repeats']} repeats, arrivals {config['arrival_rate']:g}/s, time scale {config['time_scale']:g}; "
        f"KV device + host {2 * config['device_tier_bytes'] / 2**20:.0f} MiB of "
        f"{config['expected_kv_bytes'] / 2**20:.0f}",
        header,
        "-" * len(header),
    ]
    for row in summary["turns"]:
        low, high = row["ttft_mean_s_ci"]
        mean = f"{row['ttft_mean_s']:.2f} ± {(high - low) / 2:.2f}"
        lines.append(
            f"{row['turn']:>4} {row['requests']:>8} {row['ttft_p50_s']:>8.2f} {mean:>13} "
            f"{row['prompt_tokens_mean']:>7.0f} {row['cached_tokens_mean']:>7.0f}"
        )
    return "\n".join(lines)
