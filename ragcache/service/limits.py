"""The limits a request meets: body size and nesting, checked before parsing; and the served spec stating them all.

Litestar enforces `request_max_body_size` while it reads the body: a Content-Length over it is
a 413 before a byte is read, a chunked body a 413 as soon as the bytes read pass it. The body
is read only once the guards (auth) passed, so an unauthenticated client never costs a read.
msgspec parses nesting recursively (10,000 nested arrays are a RecursionError), so the depth
is measured on the raw bytes first, without parsing them.

Every other limit is stated in the OpenAPI spec the server serves (state_limits), with the
values this server was configured with, so that a client (or schemathesis) can tell a
request the server will take from one it will refuse.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import msgspec
import numpy as np
from litestar import Request
from litestar.exceptions import ClientException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    Schema,
    SecurityScheme,
)

from ragcache import schemas
from ragcache.config import Settings

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string: brackets in it are text
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in _BRACKETS)
_STEPS = bytes.maketrans(_BRACKETS, bytes([1, 255, 1, 255]))  # opens +1, closes -1 (as int8)


def json_depth_over(body: bytes, max_depth: int) -> bool:
    """Whether arrays/objects in body nest deeper than max_depth (strings do not count; bad JSON is the parser's)."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    brackets = _STRING.sub(b"", body).translate(_STEPS, _NOT_BRACKETS)
    depth = np.cumsum(np.frombuffer(brackets, dtype=np.int8), dtype=np.int64)
    return depth.size > 0 and int(depth.max()) > max_depth


class LimitedRequest(Request):
    """A request whose body keeps to the app's settings (413 past max_body_bytes, 400 past max_json_depth)
    and to its schema strictly: `"cache": 0` is not a bool, `"max_tokens": "5"` not an int, as the spec says.

    Litestar converts bodies leniently (its kwargs also carry query strings); decoding straight into
    the handler's struct, strictly, hands Litestar a value it passes through unchanged."""

    async def body(self) -> bytes:
        try:
            return await super().body()
        except RequestEntityTooLarge:
            limit = self.app.state.settings.max_body_bytes
            raise RequestEntityTooLarge(f"the request body is over max_body_bytes ({limit} bytes)") from None

    async def json(self):
        body, max_depth = await self.body(), self.app.state.settings.max_json_depth
        if json_depth_over(body, max_depth):
            raise ClientException(f"the request body nests arrays/objects deeper than max_json_depth ({max_depth})")
        field = self.route_handler.parsed_data_field
        if field is None:
            return await super().json()
        try:
            return _decode_strictly(body, field.annotation)
        except msgspec.ValidationError as exc:
            message, _, path = str(exc).partition(" - at `$")
            detail = {"message": message, "source": "body", **({"key": path.strip("`.")} if path else {})}
            raise ValidationException(f"Validation failed for {self.method} {self.url.path}", extra=[detail]) from None
        except msgspec.DecodeError as exc:
            raise ClientException(f"the request body is not valid JSON: {exc}") from None


def _decode_strictly(body: bytes, type_):
    """body as type_, strictly; a whole float (4.0) is an integer, as JSON Schema has it and msgspec has not."""
    try:
        return msgspec.json.decode(body, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise
    return msgspec.convert(_whole_floats_as_ints(msgspec.json.decode(body)), type_, strict=True)


def _whole_floats_as_ints(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    return value


def state_limits(spec: OpenAPI, settings: Settings, tier_names: list[str], categories: list[str] | None) -> None:
    """Make the app's OpenAPI spec (changed in place, before it is first served) say what this server enforces.

    Litestar's generator drops bounds of 0 and forbid_unknown_fields, so the wire schemas are
    msgspec's own JSON Schema (what msgspec validates, additionalProperties: false included);
    then the bounds that come from settings or from the engine are filled in, and with API keys
    configured, the bearer scheme on every endpoint that answers 401. categories: the semantic cache's
    (fixed for the server's life: the admin API changes their policies, never the set), or None when
    it is off and a request's category only names its blend budget, any string."""
    named = [getattr(schemas, name) for name in spec.components.schemas if _is_struct(getattr(schemas, name, None))]
    _, wire = msgspec.json.schema_components(named, ref_template="#/components/schemas/{name}")
    for name, field, keyword, value in _configured_bounds(settings):
        _bound(wire[name]["properties"][field], keyword, value)
    wire["DocumentIn"]["properties"]["text"]["description"] = (
        f"At most {settings.max_document_tokens} tokens (max_document_tokens); a request's documents, inline "
        f"and by id, are at most {settings.max_documents} together (max_documents)"
    )
    if categories is not None:
        for name in ("ChatCompletionRequest", "RagRequestBody"):
            _bound(wire[name]["properties"]["category"], "enum", list(categories))
    spec.components.schemas.update(wire)  # plain JSON Schema dicts are served as they are
    paths = spec.paths
    assert paths is not None  # the app's routes: the generated spec always has paths
    _enum_parameter(paths["/admin/flush"].post, "tier", tier_names)
    if categories is not None:
        _enum_parameter(paths["/admin/semantic"].delete, "category", categories)
        _enum_parameter(paths["/admin/semantic/categories/{name}"].put, "name", categories)
    for operation in _operations(spec):
        _errors_are_ours(operation)
    if settings.api_keys:
        spec.components.security_schemes = {"bearer": SecurityScheme(type="http", scheme="bearer")}
        for operation in _operations(spec):
            if "401" in (operation.responses or {}):
                operation.security = [{"bearer": []}]


def _configured_bounds(settings: Settings) -> list[tuple[str, str, str, int]]:
    """(schema, field, JSON Schema keyword, value): limits the engine checks against settings."""
    tokens = [
        (name, field, "maximum", settings.max_new_tokens)
        for name, field in (
            ("ChatCompletionRequest", "max_tokens"),
            ("ChatCompletionRequest", "max_completion_tokens"),
            ("RagRequestBody", "max_tokens"),
        )
    ]
    documents = [
        (name, field, "maxItems", settings.max_documents)
        for name in ("ChatCompletionRequest", "RagRequestBody", "AddDocumentsRequest")
        for field in ("documents", "document_ids")
        if field in getattr(schemas, name).__struct_fields__
    ]
    return tokens + documents


def _bound(prop: dict, keyword: str, value: int | list[str]) -> None:
    """Set keyword on the arm of prop it applies to (the integer, array or string arm of `X | None`)."""
    kind = {"maximum": "integer", "maxItems": "array", "enum": "string"}[keyword]
    for arm in prop.get("anyOf", [prop]):
        if arm.get("type") == kind:
            arm[keyword] = value


def _enum_parameter(operation: Operation | None, name: str, values: list[str]) -> None:
    for parameter in (operation.parameters if operation is not None else None) or []:
        if isinstance(parameter, Parameter) and parameter.name == name:  # Litestar's parameters are never references
            parameter.schema = Schema(type=OpenAPIType.STRING, enum=list(values))


def _errors_are_ours(operation: Operation) -> None:
    """Litestar adds its own 400 to handlers with parameters; the errors handlers answer with an ErrorResponse."""
    for status, response in (operation.responses or {}).items():
        media = (response.content or {}).get("application/json") if isinstance(response, OpenAPIResponse) else None
        if status.startswith("4") and media is not None and not isinstance(media.schema, Reference):
            media.schema = Reference("#/components/schemas/ErrorResponse")


def _operations(spec: OpenAPI) -> Iterator[Operation]:
    for item in (spec.paths or {}).values():
        yield from (op for op in (item.get, item.put, item.post, item.delete, item.patch) if op is not None)


def _is_struct(value) -> bool:
    return isinstance(value, type) and issubclass(value, msgspec.Struct)
