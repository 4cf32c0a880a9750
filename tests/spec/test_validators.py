"""The OpenAI validation harness itself: the extracted schemas, null handling, precise errors."""

from __future__ import annotations

import json

import pytest

from tests.spec import extract_openai
from tests.spec.openai import (
    SCHEMAS_FILE,
    ShapeError,
    check_responses_stream,
    schema_names,
    typed_members,
    validate_openai,
)


def test_every_root_and_every_ref_is_in_the_committed_file():
    doc = json.loads(SCHEMAS_FILE.read_text())
    names = set(doc["$defs"])
    assert set(doc["roots"]) <= names
    missing = {
        ref.removeprefix("#/$defs/")
        for schema in doc["$defs"].values()
        for ref in _refs(schema)
        if ref.removeprefix("#/$defs/") not in names
    }
    assert not missing
    assert "nullable" not in SCHEMAS_FILE.read_text().replace("nullable: true turned", "")


def _refs(schema):
    if isinstance(schema, dict):
        if isinstance(schema.get("$ref"), str):
            yield schema["$ref"]
        for value in schema.values():
            yield from _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _refs(value)


def test_the_committed_file_is_what_the_extractor_makes_from_the_spec():
    """Checked where the spec is at hand (a developer's machine); in CI, where it is not, the
    committed file's own header and closure are checked instead (no skip)."""
    if extract_openai.DEFAULT_SPEC.exists():
        made = extract_openai.dump(extract_openai.extract(extract_openai.DEFAULT_SPEC))
        assert made == SCHEMAS_FILE.read_text(), "run `python -m tests.spec.extract_openai`"
    else:
        doc = json.loads(SCHEMAS_FILE.read_text())
        assert "openai-openapi" in json.dumps(doc)[:2000]  # it says where it came from


@pytest.mark.parametrize(
    "nullable, converted",
    [
        ({"type": "string", "nullable": True}, {"type": ["string", "null"]}),
        (
            {"type": "string", "enum": ["a"], "nullable": True},
            {"type": ["string", "null"], "enum": ["a", None]},
        ),
        (
            {"$ref": "#/components/schemas/X", "nullable": True},
            {"anyOf": [{"$ref": "#/$defs/X"}, {"type": "null"}]},
        ),
        (
            {"oneOf": [{"type": "string"}], "nullable": True},
            {"anyOf": [{"oneOf": [{"type": "string"}]}, {"type": "null"}]},
        ),
        ({"nullable": True, "description": "anything"}, {}),
        (
            {"type": "object", "properties": {"description": {"type": "string", "nullable": True}}},
            {"type": "object", "properties": {"description": {"type": ["string", "null"]}}},
        ),
    ],
    ids=["type", "enum", "ref", "union", "untyped", "property named description"],
)
def test_nullable_becomes_a_json_schema_null(nullable, converted):
    assert extract_openai.convert(nullable) == converted


ERROR = {"error": {"message": "m", "type": "t", "param": None, "code": None}}


def test_a_good_object_passes_and_a_bad_one_names_the_field():
    validate_openai("ErrorResponse", ERROR)
    with pytest.raises(ShapeError, match=r"at error: 'param' is a required property"):
        validate_openai("ErrorResponse", {"error": {"message": "m", "type": "t"}})
    with pytest.raises(ShapeError, match=r"at error/code: 3 is not valid"):
        validate_openai("ErrorResponse", {"error": {**ERROR["error"], "code": 3}})


def test_a_union_told_apart_by_type_is_checked_against_the_named_member():
    assert typed_members("ResponseStreamEvent")["response.completed"]
    with pytest.raises(ShapeError, match=r"\(as ResponseTextDeltaEvent\): at \(top\)"):
        validate_openai("ResponseStreamEvent", {"type": "response.output_text.delta"})
    with pytest.raises(ShapeError, match=r"no member has type 'response\.nonsense'"):
        validate_openai("ResponseStreamEvent", {"type": "response.nonsense"})


def test_the_shapes_the_proxy_writes_are_all_there():
    assert set(extract_openai.ROOTS) <= set(schema_names())


def response(status: str, output: list) -> dict:
    """A Response with every key the spec requires (what a dialect must write)."""
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": "m",
        "output": output,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "metadata": {},
        "temperature": 1.0,
        "top_p": 1.0,
        "usage": {
            "input_tokens": 1,
            "output_tokens": 1,
            "total_tokens": 2,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


TEXT = {"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}
ITEM = {
    "type": "message",
    "id": "msg_1",
    "status": "completed",
    "role": "assistant",
    "content": [TEXT],
}
AT = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
STREAM = [
    {"type": "response.created", "response": response("in_progress", [])},
    {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": {**ITEM, "status": "in_progress", "content": []},
    },
    {"type": "response.content_part.added", **AT, "part": {**TEXT, "text": ""}},
    {"type": "response.output_text.delta", **AT, "delta": "hi", "logprobs": []},
    {"type": "response.output_text.done", **AT, "text": "hi", "logprobs": []},
    {"type": "response.content_part.done", **AT, "part": TEXT},
    {"type": "response.output_item.done", "output_index": 0, "item": ITEM},
    {"type": "response.completed", "response": response("completed", [ITEM])},
]


def responses_sse(events):
    return "".join(
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': i})}\n\n"
        for i, e in enumerate(events)
    )


def test_a_complete_responses_stream_passes_and_gives_its_response():
    assert check_responses_stream(responses_sse(STREAM))["output"] == [ITEM]


@pytest.mark.parametrize(
    "events, complaint",
    [
        (STREAM[1:], "starts with response.created"),
        (STREAM[:-1], "ended without"),
        ([*STREAM, STREAM[3]], "after the terminal"),
        ([STREAM[0], {**STREAM[3], "logprobs": None}, STREAM[-1]], "logprobs"),
        ([STREAM[0], {"type": "response.completed", "response": {"id": "r"}}], "required"),
    ],
    ids=["no created", "no completed", "event after completed", "bad event", "bad response"],
)
def test_a_responses_stream_that_breaks_the_rules_is_refused(events, complaint):
    with pytest.raises(ShapeError, match=complaint):
        check_responses_stream(responses_sse(events))
