"""schemathesis against a real server: every operation, as a tenant and as the admin, with every check on.

The spec the server serves must describe what it does: each status it answers is documented,
each body matches its schema, data the schema allows is taken (2xx, or 401/403/404/429 for
keys, unknown ids and load), data it refuses is refused with a 4xx.
"""

from __future__ import annotations

import pytest
import schemathesis

from ragcache.storage import CpuTier, GpuTier, TieredStore

from service_server import running_server

ADMIN_KEY = "admin-key"
CALLERS = {"tenant": "k-alpha", "admin": ADMIN_KEY}

# A few examples per operation (and the coverage phase's edge cases), a fixed seed and answers of at most
# 4 tokens keep the two runs within a minute on two cores.
CONFIG = """
seed = 20261201

[generation]
max-examples = 10

# Rules JSON Schema cannot state, so schema-valid data may still be a 400 naming the rule: the order and
# content of chat messages (the last from the user or a tool, a tool message answers a call, text content,
# top_logprobs with logprobs, tool_choice naming one of the tools).
[[operations]]
include-operation-id = "createChatCompletion"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "429"]
"""


@pytest.fixture(scope="module")
def server(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer),
                         TieredStore([GpuTier(32 << 20, device="cpu"), CpuTier(32 << 20)]))
    with running_server(engine, api_keys={"k-alpha": "alpha"}, admin_key=ADMIN_KEY, max_new_tokens=4) as (url, _):
        yield url


@pytest.fixture(scope="module", params=sorted(CALLERS))
def api_schema(request, server):
    config = schemathesis.Config.from_str(f'{CONFIG}\n[auth.openapi.bearer]\nbearer = "{CALLERS[request.param]}"\n')
    return schemathesis.openapi.from_url(f"{server}/schema/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_the_server_does_what_its_spec_says(case):
    case.call_and_validate()
