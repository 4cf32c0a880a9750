"""Does an object have OpenAI's published shape? `validate_openai(schema_name, obj)`.

The schemas are tests/data/openai-schemas.json (extracted from OpenAI's OpenAPI spec by
tests/spec/extract_openai.py; it lists the names available under `roots`, and every schema they
reference is there too). Validation is JSON Schema 2020-12 with the `jsonschema` package (a dev
extra, imported on first use so that a missing install fails these checks, not collection).

A union of event or item shapes told apart by their `type` (ResponseStreamEvent, say) is
checked against the member whose `type` matches, so an error names the field that is wrong
rather than "not valid under any of the given schemas".
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.spec.sse import parse_sse

SCHEMAS_FILE = Path(__file__).resolve().parents[1] / "data" / "openai-schemas.json"


class ShapeError(AssertionError):
    """An object that does not have the shape the spec publishes."""


@functools.cache
def _document() -> dict[str, Any]:
    return json.loads(SCHEMAS_FILE.read_text())


def schema_names() -> list[str]:
    return sorted(_document()["$defs"])


@functools.cache
def _validator(name: str) -> Any:
    try:
        from jsonschema import Draft202012Validator
    except ImportError as e:  # pragma: no cover - the dev extra is missing
        raise ImportError(
            "validate_openai needs the `jsonschema` package (pyproject's dev extras)"
        ) from e
    defs = _document()["$defs"]
    if name not in defs:
        raise KeyError(f"no OpenAI schema {name!r} in {SCHEMAS_FILE.name}")
    schema = {"$schema": _document()["$schema"], "$defs": defs, "$ref": f"#/$defs/{name}"}
    return Draft202012Validator(schema)


def _type_values(name: str) -> list[Any]:
    """The values a schema's `type` property admits (its enum or const)."""
    prop = _document()["$defs"][name].get("properties", {}).get("type", {})
    if "$ref" in prop:
        prop = _document()["$defs"].get(prop["$ref"].removeprefix("#/$defs/"), {})
    if "const" in prop:
        return [prop["const"]]
    return list(prop.get("enum", []))


@functools.cache
def typed_members(name: str) -> dict[str, str]:
    """For a union of `$ref`s told apart by their `type` (nested unions flattened):
    type value -> member schema. Empty for any other schema."""
    schema = _document()["$defs"][name]
    members = schema.get("anyOf") or schema.get("oneOf") or []
    if not members or not all("$ref" in m and len(m) == 1 for m in members):
        return {}
    out: dict[str, str] = {}
    for ref in members:
        member = ref["$ref"].removeprefix("#/$defs/")
        values = _type_values(member)
        nested = typed_members(member) if not values else {}
        if not values and not nested:
            return {}
        out.update({v: member for v in values if isinstance(v, str)} | nested)
    return out


def validate_openai(schema_name: str, obj: Any) -> None:
    """Raise ShapeError naming the first thing in `obj` that OpenAI's schema refuses."""
    members = typed_members(schema_name)
    target = schema_name
    if members and isinstance(obj, dict):
        kind = obj.get("type")
        if kind not in members:
            raise ShapeError(f"{schema_name}: no member has type {kind!r}: {json.dumps(obj)[:500]}")
        target = members[kind]
    from jsonschema.exceptions import best_match

    errors = list(_validator(target).iter_errors(obj))
    if not errors:
        return
    error = best_match(errors)
    where = "/".join(str(p) for p in error.absolute_path) or "(top)"
    via = f" (as {target})" if target != schema_name else ""
    raise ShapeError(
        f"{schema_name}{via}: at {where}: {error.message}\n"
        f"{len(errors)} error(s); object: {json.dumps(obj)[:2000]}"
    )


def check_responses_stream(raw: bytes | str) -> dict[str, Any]:
    """Check a Responses API SSE stream: every event is a ResponseStreamEvent (and its
    `event:` line, if any, names its type), sequence numbers increase, the first event is
    `response.created` and the last `response.completed` (or `.failed` / `.incomplete`), whose
    `response` is a valid Response. Returns that final Response."""
    events = parse_sse(raw)
    if not events:
        raise ShapeError("an empty stream")
    last_seq = -1
    final: dict[str, Any] | None = None
    for i, event in enumerate(events):
        data = event.json()
        where = f"event {i} ({data.get('type')})"
        if event.event is not None and event.event != data.get("type"):
            raise ShapeError(f"{where}: `event: {event.event}` but data type {data.get('type')}")
        try:
            validate_openai("ResponseStreamEvent", data)
        except ShapeError as e:
            raise ShapeError(f"{where}: {e}") from None
        if data["sequence_number"] <= last_seq:
            raise ShapeError(f"{where}: sequence_number {data['sequence_number']} after {last_seq}")
        last_seq = data["sequence_number"]
        if i == 0 and data["type"] != "response.created":
            raise ShapeError(f"{where}: a stream starts with response.created")
        if final is not None:
            raise ShapeError(f"{where}: an event after the terminal {final['status']} one")
        if data["type"] in TERMINAL_EVENTS:
            final = data["response"]
    if final is None:
        raise ShapeError("the stream ended without response.completed/failed/incomplete")
    validate_openai("Response", final)
    return final


TERMINAL_EVENTS = ("response.completed", "response.failed", "response.incomplete")


def validate_openai_all(schema_name: str, objs: Iterable[Any]) -> int:
    """Validate each object (stream chunks, events); return how many there were."""
    count = 0
    for i, obj in enumerate(objs):
        try:
            validate_openai(schema_name, obj)
        except ShapeError as e:
            raise ShapeError(f"item {i}: {e}") from None
        count += 1
    return count
