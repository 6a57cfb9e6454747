"""Agent traces for `ragcache bench agents`, derived from BFCL's multi-turn data (bfcl-eval ships it).

One program = one entry of BFCL_v4_multi_turn_base.json, all its user turns or its first `turns`:

    question[i]        the i-th user turn (one user message each in the base set)
    ground_truth[i]    the calls that answer it (possible_answer/), Python call strings such as
                       "cd(folder='document')" or "sort('final_report.pdf')": parsed with ast into
                       a name and JSON arguments; positional arguments take the names of the
                       function doc's parameters in their order
    involved_classes   the API classes whose function docs (multi_turn_func_doc/) give the tools

Prompts stay short: a program lists only the functions its trace calls (a whole class lists
9 to 22 functions, up to ~17 kB of JSON) and each description loses its class preamble
("This tool belongs to ... Tool description: "). BFCL's schema types become JSON schema
ones ("dict" → "object", "float" → "number", "tuple" → "array", "any" → no constraint).

Each call carries a simulated result — deterministic JSON built from the doc's response
fields, a few dozen tokens — and a simulated duration, drawn (seeded per program and call)
from the distribution of its class's kind (TOOL_KINDS): every policy replays the same work.
with_durations draws them afresh under another seed (the bench's repeats: same calls, new delays).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

BASE_FILE = "BFCL_v4_multi_turn_base.json"
_TYPES = {"dict": "object", "float": "number", "tuple": "array"}  # and "any": no "type" at all
_SCHEMA_KEYS = ("type", "description", "properties", "items", "required", "enum")
_PREAMBLE_END = "Tool description: "


class TraceError(ValueError):
    """The BFCL data is missing, or an entry does not parse into a trace."""


@dataclass(frozen=True)
class LogNormal:
    """A tool-duration distribution fitted to a measured mean ± sd: log-normal with the same two moments.

    σ² = ln(1 + sd²/mean²), μ = ln(mean) − σ²/2; the larger sd/mean, the heavier the tail."""

    mean_s: float
    sd_s: float

    @property
    def sigma(self) -> float:
        return math.sqrt(math.log1p((self.sd_s / self.mean_s) ** 2))

    @property
    def mu(self) -> float:
        return math.log(self.mean_s) - self.sigma**2 / 2

    def draw(self, rng: random.Random) -> float:
        return rng.lognormvariate(self.mu, self.sigma)


# Continuum's measurements: web-search tool calls 1.9 ± 2.1 s, SWE-bench shell
# calls 0.9 ± 3.6 s. Each BFCL class is given the one it resembles: the file system (cd, ls, grep,
# ...) and the math API run locally, as shell commands do; every other class stands for a remote
# service (posting, messages, tickets, trading, travel, the vehicle), a network round trip as a
# web search is.
DURATIONS = {"web": LogNormal(1.9, 2.1), "shell": LogNormal(0.9, 3.6)}
TOOL_KINDS = {
    "GorillaFileSystem": "shell",
    "MathAPI": "shell",
    "TwitterAPI": "web",
    "MessageAPI": "web",
    "TicketAPI": "web",
    "TradingBot": "web",
    "TravelAPI": "web",
    "VehicleControlAPI": "web",
}


@dataclass(frozen=True)
class Call:
    """One ground-truth tool call of a trace, with what the simulated tool returns and how long it takes."""

    id: str  # the tool_call_id that ties the result to the call
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    result: str  # the simulated tool's output
    kind: str  # "web" or "shell": the distribution duration_s came from
    duration_s: float  # unscaled (the bench multiplies by --time-scale)


@dataclass(frozen=True)
class UserTurn:
    message: str
    calls: tuple[Call, ...]  # may be empty: the turn is answered without tools


@dataclass(frozen=True)
class Trace:
    id: str
    tools: tuple[dict, ...]  # OpenAI function tools: only the functions the trace calls
    turns: tuple[UserTurn, ...]

    @property
    def calls(self) -> list[Call]:
        return [call for turn in self.turns for call in turn.calls]


def data_dir() -> Path:
    """bfcl-eval's data folder (BFCL_v4_multi_turn_base.json, possible_answer/, multi_turn_func_doc/)."""
    import importlib.util

    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TraceError("the agents bench needs BFCL's data: pip install bfcl-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_traces(num_programs: int, num_turns: int | None, seed: int = 0, root: Path | None = None) -> list[Trace]:
    """num_programs entries drawn (seeded) from the base set, each cut to its first num_turns user turns
    (None: all of them, 1 to 7 in the base set)."""
    root = root or data_dir()
    entries = _read_jsonl(root / BASE_FILE)
    answers = {row["id"]: row["ground_truth"] for row in _read_jsonl(root / "possible_answer" / BASE_FILE)}
    if num_programs > len(entries):
        raise TraceError(f"BFCL's base set has {len(entries)} entries, {num_programs} asked for")
    chosen = random.Random(seed).sample(entries, num_programs)
    return [
        derive_trace(
            entry,
            answers[entry["id"]],
            function_docs(entry["involved_classes"], root),
            num_turns,
            random.Random(f"{seed}/{entry['id']}"),
        )
        for entry in chosen
    ]


def with_durations(trace: Trace, seed: int | str) -> Trace:
    """The trace with every call's duration drawn afresh, as load_traces draws them under this seed (one
    generator per program, its calls in order): the same calls and results, other delays."""
    rng = random.Random(f"{seed}/{trace.id}")
    turns = tuple(
        replace(turn, calls=tuple(replace(call, duration_s=DURATIONS[call.kind].draw(rng)) for call in turn.calls))
        for turn in trace.turns
    )
    return replace(trace, turns=turns)


def function_docs(classes: Sequence[str], root: Path | None = None) -> dict[str, tuple[str, dict]]:
    """name -> (class, BFCL function doc) over the given classes (the first class wins a shared name)."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING as FILES

    root = root or data_dir()
    docs: dict[str, tuple[str, dict]] = {}
    for name in classes:
        for doc in _read_jsonl(root / "multi_turn_func_doc" / FILES[name]):
            docs.setdefault(doc["name"], (name, doc))
    return docs


def derive_trace(
    entry: dict,
    ground_truth: list[list[str]],
    docs: dict[str, tuple[str, dict]],
    num_turns: int | None,
    rng: random.Random,
) -> Trace:
    turns, called = [], {}
    for index, (messages, calls) in enumerate(zip(entry["question"][:num_turns], ground_truth[:num_turns])):
        message = "\n".join(m["content"] for m in messages if m["role"] == "user")
        parsed = []
        for number, text in enumerate(calls):
            name, arguments = parse_call(text, docs)
            cls, doc = docs[name]
            called[name] = doc
            kind = TOOL_KINDS.get(cls, "web")
            parsed.append(
                Call(
                    f"call_{index}_{number}",
                    name,
                    json.dumps(arguments),
                    tool_result(doc, arguments),
                    kind,
                    DURATIONS[kind].draw(rng),
                )
            )
        turns.append(UserTurn(message, tuple(parsed)))
    return Trace(entry["id"], tuple(openai_tool(doc) for doc in called.values()), tuple(turns))


def parse_call(text: str, docs: dict[str, tuple[str, dict]]) -> tuple[str, dict]:
    """ "mv(source='a', destination='b')" -> ("mv", {"source": "a", "destination": "b"})."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError("not a plain function call")
        name = node.func.id
        if name not in docs:
            raise ValueError(f"no function doc for {name!r}")
        order = list(docs[name][1]["parameters"].get("properties", {}))
        if len(node.args) > len(order):
            raise ValueError("more positional arguments than parameters")
        arguments = {order[i]: ast.literal_eval(arg) for i, arg in enumerate(node.args)}
        arguments.update((kw.arg, ast.literal_eval(kw.value)) for kw in node.keywords)
    except (SyntaxError, ValueError) as exc:
        raise TraceError(f"cannot parse BFCL call {text!r}: {exc}") from None
    return name, arguments


def json_schema(schema: dict) -> dict:
    """A BFCL parameter schema as JSON schema: its types renamed, only the keys JSON schema knows."""
    out = {}
    for key in _SCHEMA_KEYS:
        if key not in schema:
            continue
        value = schema[key]
        if key == "type":
            if value == "any":
                continue
            value = _TYPES.get(value, value)
        elif key == "properties":
            value = {name: json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            value = json_schema(value)
        out[key] = value
    return out


def openai_tool(doc: dict) -> dict:
    description = doc.get("description", "")
    description = description.split(_PREAMBLE_END, 1)[-1]
    return {
        "type": "function",
        "function": {"name": doc["name"], "description": description, "parameters": json_schema(doc["parameters"])},
    }


def tool_result(doc: dict, arguments: dict) -> str:
    """The simulated tool's output: each response field (four at most) filled deterministically from the call."""
    digest = hashlib.sha256(json.dumps([doc["name"], arguments], sort_keys=True).encode()).digest()
    fields = list(doc.get("response", {}).get("properties", {}).items())[:4]
    if not fields:
        return json.dumps({"status": "ok"})
    texts = [v for v in arguments.values() if isinstance(v, str)]
    result: dict[str, object] = {}
    for i, (field, schema) in enumerate(fields):
        kind = _TYPES.get(schema.get("type"), schema.get("type"))
        number = digest[i] * 7 % 1000
        if kind in ("number", "integer"):
            result[field] = number
        elif kind == "boolean":
            result[field] = digest[i] % 4 != 0
        elif kind == "array":
            result[field] = [f"{field}_{number}", f"{field}_{number + 1}"]
        elif kind == "object":
            result[field] = {"status": "ok", "id": number}
        else:
            result[field] = f"{texts[0]} ({field.replace('_', ' ')} {number})" if texts else f"{field} {number}"
    return json.dumps(result)


def duration_stats(durations: Sequence[float]) -> dict:
    """Mean, sd and the share of the total delay the slowest 10% of calls carry."""
    n = len(durations)
    if n == 0:
        return {"calls": 0, "mean_s": None, "sd_s": None, "slowest_10pct_share": None}
    mean = sum(durations) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in durations) / (n - 1)) if n > 1 else 0.0
    slowest = sorted(durations, reverse=True)[: max(1, round(n / 10))]
    total = sum(durations)
    return {"calls": n, "mean_s": mean, "sd_s": sd, "slowest_10pct_share": sum(slowest) / total if total else None}


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise TraceError(f"cannot read BFCL data {path}: {exc}") from None
