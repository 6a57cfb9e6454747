"""Input limits and the order of checks over a real server: auth first, then body size, then nesting, then parsing."""

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from ragcache.service import auth
from ragcache.service.limits import json_depth_over
from ragcache.storage.cpu import CpuTier
from ragcache.storage.tiered import TieredStore

from conftest import QUESTION
from service_server import running_server

MAX_BODY_BYTES = 64 * 1024
TENANT, ADMIN = {"authorization": "Bearer k-alpha"}, {"authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def server(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([CpuTier(64 << 20)]))
    with running_server(engine, api_keys={"k-alpha": "alpha"}, admin_key="admin-key",
                        max_body_bytes=MAX_BODY_BYTES, max_json_depth=16, max_new_tokens=7) as (url, runtime):
        yield url


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


def raw_exchange(url: str, head: bytes, chunks=(), pause_s: float = 0.0) -> tuple[int, bytes]:
    """Send head, then each chunk, over a plain socket; the status and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest was sent
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 20:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_depth_is_measured_on_the_bytes_and_strings_do_not_count():
    assert not json_depth_over(b'{"a": [[1, 2], {"b": [3]}]}', 4)  # { [ { [ at the deepest
    assert json_depth_over(b'{"a": [[1, 2], {"b": [3]}]}', 3)
    assert not json_depth_over(b'{"text": "' + b"[" * 500 + b'\\" ]]]"}', 2)
    assert json_depth_over(b"[" * 10_000, 64)  # unbalanced too: deeper than the limit before the parser sees it


def test_json_nested_past_max_json_depth_is_a_400_naming_it(server):
    for depth in (17, 10_000):
        response = httpx.post(f"{server}/v1/chat/completions", content=nested(depth), headers={
            **TENANT, "content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == (
            "the request body nests arrays/objects deeper than max_json_depth (16)")
    within = httpx.post(f"{server}/v1/chat/completions", content=nested(14), headers={
        **TENANT, "content-type": "application/json"})
    assert within.status_code == 400 and "max_json_depth" not in within.text  # parsed, then refused as a bad message


def test_a_content_length_over_max_body_bytes_is_a_413_before_any_body_is_sent(server):
    head = (f"POST /v1/rag HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k-alpha\r\ncontent-type: application/json\r\n"
            f"content-length: {20_000_000}\r\n\r\n").encode()
    status, body = raw_exchange(server, head)  # not one byte of the 20 MB follows: the answer cannot wait for them
    assert status == 413 and b"max_body_bytes (65536 bytes)" in body


def test_a_chunked_body_is_a_413_once_the_bytes_read_pass_max_body_bytes(server):
    head = (b"POST /v1/rag HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k-alpha\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    piece = b'{"question": "' + b"a" * 16_000
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    status, body = raw_exchange(server, head, [chunk] * 40, pause_s=0.01)  # 640 kB offered, 64 kB allowed
    assert status == 413 and b"max_body_bytes" in body


def test_a_body_within_max_body_bytes_is_read(server):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1,
            "metadata": {"padding": "x" * (MAX_BODY_BYTES - 200)}}  # accepted, no effect on the answer
    assert httpx.post(f"{server}/v1/chat/completions", json=body, headers=TENANT).status_code == 200


def test_auth_comes_before_the_body_is_parsed(server):
    bad = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    assert httpx.post(f"{server}/v1/rag", **bad).status_code == 401
    assert httpx.post(f"{server}/v1/chat/completions", content=nested(10_000),
                      headers={"content-type": "application/json"}).status_code == 401
    tenant_on_admin = httpx.put(f"{server}/admin/blend/categories/x", content=b"[[[", headers={
        **TENANT, "content-type": "application/json"})
    assert tenant_on_admin.status_code == 403 and tenant_on_admin.json()["error"]["type"] == "permission_error"
    assert httpx.put(f"{server}/admin/blend/categories/x", content=b"[[[",
                     headers={**ADMIN, "content-type": "application/json"}).status_code == 400


def test_no_key_and_an_oversized_body_is_a_401_and_the_body_is_never_read(server):
    head = f"POST /v1/rag HTTP/1.1\r\nhost: x\r\ncontent-length: {20_000_000}\r\n\r\n".encode()
    status, body = raw_exchange(server, head)
    assert status == 401 and b"missing API key" in body


def test_a_wrong_admin_key_is_a_403_through_the_constant_time_comparison(server, monkeypatch):
    compared = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    response = httpx.get(f"{server}/admin/stats", headers={"authorization": "Bearer admin-kez"})
    assert response.status_code == 403 and response.json()["error"]["message"] == "this key is not the admin key"
    assert compared == [(32, 32)]  # sha256 digests: the same length whatever the key


def test_tenant_keys_are_each_compared_whichever_matches(monkeypatch):
    keys = {"k-one": "one", "k-two": "two", "k-three": "three"}
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(b) or real(a, b))
    assert auth.matching_key("k-one", keys) == "k-one"
    assert auth.matching_key("k-nope", keys) is None
    assert len(compared) == 6  # every key compared on each lookup, whether the first matches or none does


def test_the_served_spec_states_the_configured_limits(server):
    spec = httpx.get(f"{server}/schema/openapi.json").json()
    schemas = spec["components"]["schemas"]
    chat, rag = schemas["ChatCompletionRequest"]["properties"], schemas["RagRequestBody"]
    assert chat["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 7}
    assert rag["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 7
    assert chat["messages"]["minItems"] == 1 and schemas["AddDocumentsRequest"]["properties"]["documents"] == {
        "type": "array", "items": {"$ref": "#/components/schemas/DocumentIn"}, "minItems": 1, "maxItems": 64}
    assert chat["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["assistant", "developer", "system", "tool", "user"]
    assert rag["additionalProperties"] is False and "additionalProperties" not in schemas["ChatCompletionRequest"]
    assert schemas["ToolStart"]["required"] == ["type", "tool"] and schemas["ToolStart"]["properties"]["tool"] == {
        "type": "string", "minLength": 1}
    flush = spec["paths"]["/admin/flush"]["post"]
    assert [p["schema"] for p in flush["parameters"] if p["name"] == "tier"] == [{"type": "string", "enum": ["cpu"]}]
    rag_op = spec["paths"]["/v1/rag"]["post"]
    assert sorted(rag_op["responses"]) == ["200", "400", "401", "404", "413", "429", "503"]
    assert rag_op["security"] == [{"bearer": []}] and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert sorted(spec["paths"]["/admin/stats"]["get"]["responses"]) == ["200", "401", "403"]
    assert "security" not in spec["paths"]["/health"]["get"]
    allow = httpx.options(f"{server}/admin/semantic").headers["allow"]
    assert allow == "DELETE, GET, OPTIONS"


def test_bodies_are_held_to_their_schema_strictly(server):
    lax = httpx.post(f"{server}/v1/rag", json={"question": QUESTION, "cache": 0}, headers=TENANT)
    assert lax.status_code == 400 and lax.json()["error"]["message"] == "cache: Expected `bool`, got `int`"
    over = httpx.post(f"{server}/v1/rag", json={"question": QUESTION, "max_tokens": 8}, headers=TENANT)
    assert over.status_code == 400 and "max_tokens must be in [1, 7]" in over.json()["error"]["message"]
    whole = httpx.post(f"{server}/v1/rag", json={"question": QUESTION, "max_tokens": 2.0}, headers=TENANT)
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] <= 2  # JSON Schema's integer
    tiny = httpx.post(f"{server}/v1/rag", json={"question": QUESTION, "temperature": 1e-40}, headers=TENANT)
    assert tiny.status_code == 200  # greedy, where sampling at T = 1e-40 would overflow
    assert tiny.json()["usage"]["completion_tokens"] <= 7  # no max_tokens: 128, capped at max_new_tokens
