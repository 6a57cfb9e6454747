"""schemathesis against a real server: every operation, as a tenant and as the admin, with every check on.

The spec the server serves must describe what it does: each status it answers is documented,
each body matches its schema, data the schema allows is taken (2xx, or 401/403/404/429 for
keys, unknown ids and load), data it refuses is refused with a 4xx.

schemathesis runs through its command line, its public interface: its pytest plugin reaches
into pytest's private node attributes, which pytest 9.2 removed.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ragcache.semantic.answers import make_answer_store
from ragcache.semantic.cache import SemanticCache
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

from semantic_fixtures import embedder  # noqa: F401  the real MiniLM, once per session
from service_server import running_server

ADMIN_KEY = "admin-key"
CALLERS = {"tenant": "k-alpha", "admin": ADMIN_KEY}

# A few examples per operation (and the coverage phase's edge cases), a fixed seed and answers of at most
# 4 tokens keep the two runs within a minute on two cores.
CONFIG = """
seed = 20261201

[generation]
max-examples = 10

# The only operations allowed a 400 on schema-valid data, each for rules JSON Schema cannot state.
# Chat: the order and content of messages (the last from the user or a tool, a tool message answers a
# call, text content), top_logprobs only with logprobs, tool_choice naming one of the request's tools.
[[operations]]
include-operation-id = "createChatCompletion"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "429"]

# A category's policy: min_threshold <= threshold <= max_threshold and ttl_s <= max_ttl_s (an order
# between fields).
[[operations]]
include-operation-id = "setCategoryPolicy"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "429"]
"""


@pytest.fixture(scope="module")
def server(tokenizer, embedder):  # noqa: F811
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer),
                         TieredStore([GpuTier(32 << 20, device="cpu"), CpuTier(32 << 20)]))
    semantic = SemanticCache(embedder, make_answer_store(None))
    with running_server(engine, semantic, api_keys={"k-alpha": "alpha"}, admin_key=ADMIN_KEY,
                        max_new_tokens=4) as (url, _):
        yield url


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_the_server_does_what_its_spec_says(server, caller, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'{CONFIG}\n[auth.openapi.bearer]\nbearer = "{CALLERS[caller]}"\n')
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
         f"{server}/schema/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing",
         "--workers", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-15000:] + run.stderr[-2000:]
    # every operation tested, every generated case passed (exit 0 already says no check failed)
    selected, tested = re.search(r"Selected: (\d+)/\d+\s+Tested: (\d+)", run.stdout).groups()
    generated, passed = re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups()
    assert int(selected) == int(tested) >= 17 and int(generated) == int(passed) > 17 * 10, run.stdout[-3000:]
