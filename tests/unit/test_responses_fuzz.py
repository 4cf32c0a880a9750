"""Property: whatever Responses body a client sends, the translation answers a 400 naming what
is wrong, or gives a chat body that the engine accepts and every provider either builds or
refuses with a 4xx. Never an exception of any other kind (a 500 from the proxy)."""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mitmroute.config import parse_config
from mitmroute.engine import Engine
from mitmroute.errors import ProxyError
from mitmroute.inbound.responses.request import translate
from mitmroute.providers import CHAT, provider_for

EXAMPLES = int(os.environ.get("MITMROUTE_FUZZ_EXAMPLES", "400"))
DEPLOYMENTS = parse_config(
    {
        "model_list": [
            {"model_name": n, "litellm_params": {"model": m, "api_base": "http://127.0.0.1:9"}}
            for n, m in [
                ("a", "openai/gpt-4o"),
                ("b", "ollama_chat/qwen3"),
                ("c", "anthropic/claude-x"),
            ]
        ]
    },
    environ={},
).deployments

scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
part_types = st.sampled_from(
    ["input_text", "output_text", "input_image", "input_file", "refusal", "text", "audio"]
)
parts = st.fixed_dictionaries(
    {"type": part_types | values},
    optional={
        "text": st.text(max_size=10) | values,
        "image_url": st.text(max_size=10) | values,
        "file_data": st.text(max_size=10),
        "refusal": values,
    },
)
item_types = st.sampled_from(
    [
        "message",
        "function_call",
        "function_call_output",
        "custom_tool_call",
        "custom_tool_call_output",
        "reasoning",
        "item_reference",
        "web_search_call",
    ]
)
items = st.fixed_dictionaries(
    {},
    optional={
        "type": item_types | values,
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | values,
        "content": st.text(max_size=10) | st.lists(parts, max_size=3) | values,
        "call_id": st.text(max_size=6) | values,
        "name": st.text(max_size=6) | values,
        "arguments": st.just('{"a": 1}') | st.text(max_size=6) | values,
        "input": st.text(max_size=6) | values,
        "output": st.text(max_size=6) | st.lists(parts, max_size=2) | values,
    },
)
tools = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "custom", "namespace", "web_search"]) | values},
    optional={
        "name": st.text(max_size=6) | values,
        "parameters": values,
        "description": values,
        "format": values,
        "strict": values,
        "tools": st.lists(
            st.fixed_dictionaries(
                {"type": st.just("function"), "name": st.text(min_size=1, max_size=4)}
            ),
            max_size=2,
        ),
    },
)


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values nine times in ten, anything JSON otherwise."""
    return st.tuples(st.integers(0, 9), valid, values).map(lambda t: t[2] if t[0] == 7 else t[1])


numbers = st.floats(0, 1) | st.integers(0, 1)
words = st.text(min_size=1, max_size=8)
text_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("input_text"), "text": words}), min_size=1, max_size=2
)
names = st.sampled_from(["get_weather", "apply_patch", "f"])
valid_items = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer"]),
            "content": words | text_parts,
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": words,
            "name": names,
            "arguments": st.just('{"a": 1}'),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": words, "output": words | text_parts}
    ),
    st.fixed_dictionaries(
        {"type": st.just("custom_tool_call"), "call_id": words, "name": names, "input": words}
    ),
    st.fixed_dictionaries(
        {"type": st.just("custom_tool_call_output"), "call_id": words, "output": words}
    ),
    st.fixed_dictionaries({"type": st.just("reasoning"), "summary": st.just([])}),
)
valid_tools = st.sampled_from(
    [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
        {"type": "custom", "name": "apply_patch"},
        {
            "type": "namespace",
            "name": "ns",
            "description": "d",
            "tools": [{"type": "function", "name": "f"}],
        },
    ]
)
well_formed = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "input": mostly(
            st.text(max_size=20)
            | st.lists(
                st.one_of(valid_items, valid_items, valid_items, items), min_size=1, max_size=5
            )
        ),
    },
    optional={
        "instructions": mostly(st.text(max_size=10)),
        "tools": mostly(st.lists(st.one_of(valid_tools, valid_tools, tools), max_size=3)),
        "tool_choice": mostly(st.sampled_from(["auto", "none", "required"])),
        "parallel_tool_calls": mostly(st.booleans()),
        "reasoning": mostly(st.fixed_dictionaries({"effort": st.sampled_from(["low", "high"])})),
        "text": mostly(
            st.fixed_dictionaries(
                {
                    "format": st.sampled_from(
                        [
                            {"type": "text"},
                            {"type": "json_object"},
                            {"type": "json_schema", "name": "A", "schema": {"type": "object"}},
                        ]
                    )
                }
            )
        ),
        "max_output_tokens": mostly(st.integers(1, 100)),
        "temperature": mostly(numbers),
        "top_p": mostly(numbers),
        "metadata": mostly(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)),
        "store": mostly(st.booleans()),
        "stream": mostly(st.booleans()),
        "truncation": mostly(st.sampled_from(["auto", "disabled"])),
        "include": mostly(st.lists(st.text(max_size=8), max_size=2)),
        "user": mostly(st.text(max_size=5)),
        "service_tier": mostly(st.sampled_from(["auto", "flex"])),
        "background": mostly(st.just(False)),
    },
)
unknown = st.fixed_dictionaries({"model": st.just("m"), "input": st.just("x"), "unknown": values})
bodies = st.tuples(st.integers(0, 9), well_formed, unknown).map(
    lambda t: t[2] if t[0] == 7 else t[1]
)


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(body=bodies, hints=st.booleans())
def test_any_responses_body_is_a_400_or_a_chat_body_every_provider_takes(
    body: dict[str, Any], hints: bool
) -> None:
    try:
        translated = translate(body, openai_only=hints)
    except ProxyError as e:
        assert e.status == 400 and e.message
        return
    chat = Engine._parse_body(json.dumps(translated.chat).encode(), CHAT)
    for deployment in DEPLOYMENTS:
        try:
            provider_for(deployment.provider).build(CHAT, chat, deployment, drop_params=False)
        except ProxyError as e:
            assert 400 <= e.status < 500, e
