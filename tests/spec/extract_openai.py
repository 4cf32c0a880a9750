"""Regenerate tests/data/openai-schemas.json from OpenAI's published OpenAPI spec.

    python -m tests.spec.extract_openai [--spec ../shared/openai-openapi.json] [--out ...]

It keeps the `$ref` closure of ROOTS (the shapes the proxy writes in OpenAI's dialect) as JSON
Schema 2020-12 `$defs`, and:

* turns OpenAPI 3.0's `nullable: true` (which the 3.1 spec still uses in ~110 places) into JSON
  Schema nulls: `"type": T` becomes `[T, "null"]` (an `enum` gains `null`); a schema without a
  type (`$ref`, `anyOf`, ...) becomes `{"anyOf": [<it>, {"type": "null"}]}`;
* rewrites `#/components/schemas/X` to `#/$defs/X`;
* drops what validation never reads (descriptions, titles, examples, defaults, `x-*` vendor
  keys, `discriminator`, `deprecated`), keeping the file small enough to commit.

CI has no ../shared: the tests read only the committed output, whose `$comment` says where it
came from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = ROOT.parent / "shared" / "openai-openapi.json"
DEFAULT_OUT = ROOT / "tests" / "data" / "openai-schemas.json"

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "Error",
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
)
"""The shapes the proxy writes in OpenAI's dialect: chat completions and their stream chunks,
completions, embeddings, the models list, errors, Responses objects and their stream events,
stored responses' input items."""

DROPPED = frozenset(
    {
        "description",
        "title",
        "example",
        "examples",
        "default",
        "discriminator",
        "deprecated",
        "externalDocs",
        "xml",
        "readOnly",
        "writeOnly",
        "format",
    }
)
"""Annotations: a validator never reads them (`format` is annotation-only in 2020-12)."""

SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = (
    "items",
    "additionalProperties",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
)
REF_PREFIX = "#/components/schemas/"


def convert(schema: Any) -> Any:
    """One schema node (and its subschemas) in JSON Schema 2020-12 terms, annotations dropped."""
    if not isinstance(schema, dict):
        return schema  # `true`/`false` schemas
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DROPPED or key.startswith("x-") or key == "nullable":
            continue
        if key == "$ref":
            out[key] = "#/$defs/" + value.removeprefix(REF_PREFIX)
        elif key in SCHEMA_MAPS:
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS:
            out[key] = [convert(sub) for sub in value]
        elif key in SCHEMA_VALUES:
            out[key] = convert(value)
        else:
            out[key] = value
    return with_null(out) if schema.get("nullable") is True else out


def with_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`nullable: true` the JSON Schema way."""
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        schema = {**schema, "type": [*types, "null"] if "null" not in types else types}
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    if not schema:
        return schema  # any value, null included
    return {"anyOf": [schema, {"type": "null"}]}


def refs_in(schema: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF_PREFIX):
            found.add(ref.removeprefix(REF_PREFIX))
        for value in schema.values():
            found |= refs_in(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= refs_in(value)
    return found


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise KeyError(f"{name} is not in the spec's components.schemas")
        seen.add(name)
        todo.extend(refs_in(schemas[name]) - seen)
    return sorted(seen)


def extract(spec_path: Path) -> dict[str, Any]:
    raw = spec_path.read_bytes()
    spec = json.loads(raw)
    schemas = spec["components"]["schemas"]
    names = closure(schemas, ROOTS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Extracted from OpenAI's published OpenAPI spec (openai/openai-openapi, OpenAPI "
            f"{spec['openapi']}, API version {spec['info']['version']}, sha256 "
            f"{hashlib.sha256(raw).hexdigest()[:16]}) by `python -m tests.spec.extract_openai`: "
            f"the $ref closure of {', '.join(ROOTS)} ({len(names)} schemas); nullable: true "
            "turned into JSON Schema nulls; annotations dropped. Do not edit by hand."
        ),
        "roots": list(ROOTS),
        "$defs": {name: convert(schemas[name]) for name in names},
    }


def dump(doc: dict[str, Any]) -> str:
    """Compact, one schema per line (small, and a spec update diffs schema by schema)."""

    def compact(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    head = {k: v for k, v in doc.items() if k != "$defs"}
    lines = [f" {compact(k)}: {compact(v)}," for k, v in head.items()]
    defs = [f"  {compact(k)}: {compact(v)}" for k, v in sorted(doc["$defs"].items())]
    return "{\n" + "\n".join(lines) + '\n "$defs": {\n' + ",\n".join(defs) + "\n }\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.write_text(dump(extract(args.spec)))
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
