"""A Responses API request (`POST /v1/responses`) as the engine's chat completions body.

`translate(body, context, openai_only=...)` checks every field and returns the chat body, the
fields the `response` object echoes, the tool table (to name tool calls back) and the input
items to store. What happens to each field:

* translated: `input` (a string, or items: messages with input_text / input_image / input_file
  parts, function_call, function_call_output, custom_tool_call, custom_tool_call_output) and
  `instructions` -> `messages` (instructions and system/developer messages as system messages;
  consecutive tool calls folded into one assistant message); `tools` (function tools as they
  are, custom tools as a function with one string parameter `input`, namespaced tools as
  `<namespace>__<name>`), `tool_choice`, `parallel_tool_calls` (both only with tools),
  `max_output_tokens` -> `max_completion_tokens`, `text.format` -> `response_format`,
  `temperature`, `top_p`, `user`, `stream` (with usage, always), mitmroute's own `cache`.
* OpenAI-only, for `openai_only` requests (every deployment the request may reach is
  OpenAI-compatible, or `drop_params` is on): the hints `reasoning.effort` ->
  `reasoning_effort`, `text.verbosity` -> `verbosity`, `service_tier`, `prompt_cache_key`,
  `safety_identifier` (left out otherwise), and input_file parts (a 400 otherwise).
* kept by the proxy: `store`, `previous_response_id`, `metadata` (echoed, never sent upstream).
* accepted and ignored: `include`, `truncation` ("disabled" or "auto": the proxy never
  truncates), `stream_options`, `max_tool_calls`, `prompt_cache_retention`,
  `prompt_cache_options`, Codex's `client_metadata`; `reasoning` input items are dropped.
* refused (400 naming it): hosted tools (web_search, file_search, code_interpreter, computer
  use, image_generation, mcp, local_shell, shell, apply_patch, tool_search, ...) and tool
  choices naming them, `background`, `conversation`, `prompt`, `context_management`,
  `moderation`, `top_logprobs` > 0, `item_reference` and hosted-tool input items, file ids, and
  any other field.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from mitmroute.errors import ProxyError, bad_request

Item = dict[str, Any]

TRANSLATED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning",
        "max_output_tokens",
        "text",
        "temperature",
        "top_p",
        "user",
        "stream",
        "cache",
    }
)
KEPT = frozenset({"store", "previous_response_id", "metadata"})
HINTS = ("service_tier", "prompt_cache_key", "safety_identifier")
IGNORED = frozenset(
    {
        "include",
        "truncation",
        "stream_options",
        "max_tool_calls",
        "prompt_cache_retention",
        "prompt_cache_options",
        "client_metadata",
    }
)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "context_management": (None, []),
    "moderation": (None,),
    "top_logprobs": (None, 0),
}
"""Fields the proxy can't honour, with the values that ask for nothing."""
TOOL_KINDS = frozenset({"function", "custom", "namespace"})
CALLS = frozenset({"function_call", "custom_tool_call"})
OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})
ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "custom_tool_call": "ctc",
    "function_call_output": "fco",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}
NAMESPACE_SEP = "__"


def _bad(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return bad_request(message, param=param, code=code)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    kind: str
    """`function` or `custom`."""
    name: str
    namespace: str | None = None


@dataclass(slots=True)
class ToolTable:
    """The client's function and custom tools by the name the chat backend knows them by."""

    by_chat_name: dict[str, ToolSpec] = field(default_factory=dict)

    def add(self, spec: ToolSpec) -> str:
        name = chat_name(spec.name, spec.namespace)
        self.by_chat_name[name] = spec
        return name

    def spec(self, name: str) -> ToolSpec:
        """The tool a chat tool call names (an unknown name: a plain function)."""
        return self.by_chat_name.get(name) or ToolSpec("function", name)


def chat_name(name: str, namespace: str | None) -> str:
    return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name


@dataclass(slots=True)
class Translated:
    chat: dict[str, Any]
    """The chat completions body for the engine."""
    echo: dict[str, Any]
    """The request's fields as the `response` object shows them."""
    tools: ToolTable
    items: list[Item]
    """Everything the model saw (the previous response's context, then this input), with ids."""
    stream: bool
    store: bool
    previous_response_id: str | None


def translate(
    body: dict[str, Any], context: list[Item] | None = None, *, openai_only: bool = False
) -> Translated:
    """The chat body for a (model-checked) Responses request; `context`: the input and output
    of the response `previous_response_id` names. Raises ProxyError (400) naming what is wrong."""
    _check_fields(body)
    raw_input, extra_tools = _additional_tools(body.get("input"))
    raw_tools = body.get("tools")
    if extra_tools:
        if raw_tools is not None and not isinstance(raw_tools, list):
            raise _bad("`tools` must be an array", param="tools")
        raw_tools = [*(raw_tools or []), *extra_tools]
    tools, chat_tools, echo_tools = _tools(raw_tools)
    new_items = _input_items(raw_input)
    items = [*(context or []), *new_items]
    messages = to_messages(items, tools)
    instructions = _optional(body, "instructions", str)
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    if not messages:
        raise _bad("`input` must not be empty", param="input")
    if not openai_only and any(_has_file(item) for item in items):
        raise _bad(
            "input_file parts reach only OpenAI-compatible deployments, and this model group "
            "(or its fallbacks) has others",
            param="input",
        )
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    stream = _optional(body, "stream", bool) or False
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for key, kind in (("temperature", (int, float)), ("top_p", (int, float))):
        if (value := _optional(body, key, kind)) is not None:
            chat[key] = value
    if (limit := _optional(body, "max_output_tokens", int)) is not None:
        if limit < 1:
            raise _bad("`max_output_tokens` must be a positive integer", "max_output_tokens")
        chat["max_completion_tokens"] = limit
    if user := _optional(body, "user", str):
        chat["user"] = user
    parallel = _optional(body, "parallel_tool_calls", bool)
    tool_choice = body.get("tool_choice")
    if chat_tools:
        chosen, chat["tools"] = _tool_choice(tool_choice, chat_tools, tools)
        if chosen is not None:
            chat["tool_choice"] = chosen
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
    elif isinstance(tool_choice, dict):
        raise _bad("`tool_choice` names a tool, but there are no `tools`", "tool_choice")
    reasoning = _reasoning(body)
    text = _text(body)
    if (fmt := text.get("format")) is not None and fmt.get("type") != "text":
        chat["response_format"] = _response_format(fmt)
    if openai_only:
        if reasoning and reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
        chat.update({k: body[k] for k in HINTS if body.get(k) is not None})
    if "cache" in body:
        chat["cache"] = body["cache"]
    metadata = _metadata(body)
    store = _optional(body, "store", bool)
    previous = _optional(body, "previous_response_id", str)
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise _bad("`truncation` must be 'auto' or 'disabled'", param="truncation")
    echo: dict[str, Any] = {
        "instructions": instructions,
        "max_output_tokens": chat.get("max_completion_tokens"),
        "metadata": metadata,
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": previous,
        "reasoning": reasoning,
        "store": store is not False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, **text},
        "tool_choice": "auto" if tool_choice is None else tool_choice,
        "tools": echo_tools,
        "top_p": body.get("top_p", 1.0),
        "truncation": truncation or "disabled",
        **{k: body[k] for k in ("user", *HINTS) if body.get(k) is not None},
    }
    return Translated(chat, echo, tools, items, stream, store is not False, previous)


# --- fields --------------------------------------------------------------------------------


def _check_fields(body: dict[str, Any]) -> None:
    for key in HINTS:
        _optional(body, key, str)
    for key, value in body.items():
        if key in TRANSLATED or key in KEPT or key in IGNORED or key in HINTS:
            continue
        if key in NEUTRAL:
            if value in NEUTRAL[key]:
                continue
            raise _bad(
                f"`{key}` is not supported by mitmroute's Responses API, which answers from "
                "chat-completions backends",
                param=key,
                code="unsupported_parameter",
            )
        raise _bad(f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
    include = body.get("include")
    if include is not None and not (
        isinstance(include, list) and all(isinstance(i, str) for i in include)
    ):
        raise _bad("`include` must be a list of strings", param="include")


def _optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = {str: "a string", bool: "a boolean", int: "an integer"}
        what = names.get(kind, "a number") if isinstance(kind, type) else "a number"
        raise _bad(f"`{key}` must be {what}", param=key)
    return value


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("`metadata` must be an object of string values", param="metadata")
    if len(metadata) > 16:
        raise _bad("`metadata` holds at most 16 keys", param="metadata")
    return metadata


def _reasoning(body: dict[str, Any]) -> dict[str, Any] | None:
    reasoning = body.get("reasoning")
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise _bad("`reasoning` must be an object", param="reasoning")
    picked = {k: reasoning.get(k) for k in ("effort", "summary")}
    for key, value in picked.items():
        if value is not None and not isinstance(value, str):
            raise _bad(f"`reasoning.{key}` must be a string", param=f"reasoning.{key}")
    return picked


def _text(body: dict[str, Any]) -> dict[str, Any]:
    text = body.get("text")
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise _bad("`text` must be an object", param="text")
    fmt = text.get("format")
    if fmt is not None and (
        not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_schema", "json_object")
    ):
        raise _bad(
            "`text.format.type` must be 'text', 'json_schema' or 'json_object'",
            param="text.format",
        )
    if text.get("verbosity") is not None and not isinstance(text["verbosity"], str):
        raise _bad("`text.verbosity` must be a string", param="text.verbosity")
    return {k: v for k, v in text.items() if k in ("format", "verbosity") and v is not None}


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = fmt.get("schema")
    if not isinstance(schema, dict) or not isinstance(fmt.get("name"), str):
        raise _bad(
            "`text.format` of type json_schema needs a `name` and a `schema` object",
            param="text.format",
        )
    spec = {"name": fmt["name"], "schema": schema}
    spec.update({k: fmt[k] for k in ("description", "strict") if fmt.get(k) is not None})
    return {"type": "json_schema", "json_schema": spec}


# --- tools ---------------------------------------------------------------------------------


def _tools(raw: Any) -> tuple[ToolTable, list[dict[str, Any]], list[dict[str, Any]]]:
    """The tool table, the chat tools and the tools as the `response` object echoes them."""
    table, chat, echo = ToolTable(), [], []
    if raw is None:
        return table, chat, echo
    if not isinstance(raw, list):
        raise _bad("`tools` must be an array", param="tools")
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            raise _bad(f"{where} must be an object with a `type`", param=where)
        if kind not in TOOL_KINDS:
            raise hosted_tool(kind, where)
        if kind == "namespace":
            namespace = tool.get("name")
            inner = tool.get("tools")
            if not isinstance(namespace, str) or not namespace or not isinstance(inner, list):
                raise _bad(f"{where} needs a `name` and `tools`", param=where)
            for j, member in enumerate(inner):
                at = f"{where}.tools[{j}]"
                member_kind = member.get("type") if isinstance(member, dict) else None
                if member_kind not in ("function", "custom"):
                    raise _bad(f"{at}: a namespace holds function and custom tools", at)
                chat.append(_chat_tool(member, at, table, namespace))
        else:
            chat.append(_chat_tool(tool, where, table, None))
        echo.append(_echo_tool(tool))
    return table, chat, echo


def hosted_tool(kind: str, where: str) -> ProxyError:
    return _bad(
        f"The hosted tool `{kind}` is not available through mitmroute: it answers from "
        "chat-completions backends, which have no hosted tools. Use function tools.",
        param=where,
        code="unsupported_tool",
    )


def _chat_tool(
    tool: dict[str, Any], where: str, table: ToolTable, namespace: str | None
) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where} needs a `name`", param=f"{where}.name")
    description = tool.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{where}.description must be a string", param=f"{where}.description")
    if tool["type"] == "custom":
        function = {"name": table.add(ToolSpec("custom", name, namespace))}
        function["description"] = _custom_description(description, tool.get("format"))
        function["parameters"] = {
            "type": "object",
            "properties": {"input": {"type": "string", "description": "The tool's whole input."}},
            "required": ["input"],
        }
        return {"type": "function", "function": function}
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _bad(f"{where}.parameters must be an object", param=f"{where}.parameters")
    function = {"name": table.add(ToolSpec("function", name, namespace))}
    if description:
        function["description"] = description
    function["parameters"] = parameters or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _custom_description(description: Any, fmt: Any) -> str:
    text = description if isinstance(description, str) else ""
    if isinstance(fmt, dict) and fmt.get("type") == "grammar" and fmt.get("definition"):
        syntax = fmt.get("syntax", "lark")
        text += f"\n\nThe `input` string must follow this {syntax} grammar:\n{fmt['definition']}"
    return text.strip() or "A tool that takes free-form text."


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool["type"] != "function":
        return tool
    return {"parameters": None, "strict": None, **tool}


def _tool_choice(
    choice: Any, chat_tools: list[dict[str, Any]], table: ToolTable
) -> tuple[Any, list[dict[str, Any]]]:
    """The chat `tool_choice` and the tools it leaves the model (allowed_tools narrows them)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice, chat_tools
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("function", "custom"):
        name = chat_name(str(choice.get("name")), choice.get("namespace"))
        if name not in table.by_chat_name:
            raise _bad(f"tool_choice names `{name}`, which is not in `tools`", "tool_choice")
        return {"type": "function", "function": {"name": name}}, chat_tools
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        allowed = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise _bad("allowed_tools needs a `mode` and `tools`", param="tool_choice")
        names = set()
        for tool in allowed:
            if not isinstance(tool, dict) or tool.get("type") not in ("function", "custom"):
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise hosted_tool(str(kind), "tool_choice.tools")
            names.add(chat_name(str(tool.get("name")), tool.get("namespace")))
        kept = [t for t in chat_tools if t["function"]["name"] in names]
        if not kept:
            raise _bad("allowed_tools names none of `tools`", param="tool_choice")
        return mode, kept
    if isinstance(kind, str):
        raise hosted_tool(kind, "tool_choice")
    raise _bad(f"unsupported tool_choice {choice!r}", param="tool_choice")


# --- input items -----------------------------------------------------------------------------


def _additional_tools(raw: Any) -> tuple[Any, list[Any]]:
    """`input` without its `additional_tools` items (the Codex CLI sends its tools that way, in
    place of a top-level `tools`), and the tools those items carry."""
    if not isinstance(raw, list):
        return raw, []
    kept, tools = [], []
    for i, item in enumerate(raw):
        if not (isinstance(item, dict) and item.get("type") == "additional_tools"):
            kept.append(item)
            continue
        if not isinstance(item.get("tools"), list):
            raise _bad(f"input[{i}].tools must be an array", param=f"input[{i}].tools")
        tools += item["tools"]
    return kept, tools


def _input_items(raw: Any) -> list[Item]:
    """The request's `input` as items with ids (what is stored, and turned into messages)."""
    if isinstance(raw, str):
        return [_message({"role": "user", "content": raw}, "input")]
    if not isinstance(raw, list):
        raise _bad("`input` must be a string or an array of items", param="input")
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def _item(item: Any, where: str) -> Item:
    if not isinstance(item, dict):
        raise _bad(f"{where} must be an object", param=where)
    kind = item.get("type", "message" if "role" in item else None)
    if not isinstance(kind, str):
        raise _bad(f"{where} needs a `type`", param=where)
    if kind == "message":
        return _message(item, where)
    if kind in CALLS:
        key = "arguments" if kind == "function_call" else "input"
        for required in ("call_id", "name", key):
            if not isinstance(item.get(required), str):
                raise _bad(f"{where}.{required} must be a string", f"{where}.{required}")
        return {**item, "id": item.get("id") or new_id(ID_PREFIX[kind]), "status": "completed"}
    if kind in OUTPUTS:
        if not isinstance(item.get("call_id"), str):
            raise _bad(f"{where}.call_id must be a string", param=f"{where}.call_id")
        output = item.get("output")
        if not isinstance(output, str | list):
            raise _bad(f"{where}.output must be a string or an array", f"{where}.output")
        return {**item, "id": item.get("id") or new_id(ID_PREFIX[kind]), "status": "completed"}
    if kind == "reasoning":
        return {"summary": [], **item, "id": item.get("id") or new_id("rs")}
    raise _bad(
        f"{where}: input items of type `{kind}` are not supported by mitmroute (it keeps no "
        "items but whole stored responses: use previous_response_id, or send the item itself)",
        param=where,
        code="unsupported_input_item",
    )


def _message(item: dict[str, Any], where: str) -> Item:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise _bad(f"{where}.role must be user, assistant, system or developer", where)
    content = item.get("content")
    if isinstance(content, str):
        part = "output_text" if role == "assistant" else "input_text"
        content = [{"type": part, "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or an array", f"{where}.content")
    parts = [_part(p, role, f"{where}.content[{j}]") for j, p in enumerate(content)]
    return {
        "id": item.get("id") or new_id("msg"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": parts,
    }


def _part(part: Any, role: str, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text", "refusal"):
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text must be a string", param=where)
        if role == "assistant":
            if kind == "refusal":
                return {"type": "refusal", "refusal": text}
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "input_text", "text": text}
    if kind == "input_image" and role == "user":
        if not isinstance(part.get("image_url"), str):
            raise _bad(
                f"{where}: send images as `image_url` (an URL or a data: URI); file ids name "
                "OpenAI's Files API, which mitmroute does not route",
                param=where,
            )
        return {
            "type": "input_image",
            "image_url": part["image_url"],
            "detail": part.get("detail") or "auto",
        }
    if kind == "input_file" and role == "user":
        if not isinstance(part.get("file_data"), str):
            raise _bad(
                f"{where}: send files as `file_data`; file ids and URLs are not routed",
                param=where,
            )
        return {k: v for k, v in part.items() if k in ("type", "file_data", "filename")}
    raise _bad(f"{where}: `{kind}` content is not supported in {role} messages", where)


def _has_file(item: Item) -> bool:
    parts = item.get("content") if item["type"] == "message" else item.get("output")
    return isinstance(parts, list) and any(
        isinstance(p, dict) and p.get("type") == "input_file" for p in parts
    )


def to_messages(items: list[Item], tools: ToolTable) -> list[dict[str, Any]]:
    """Chat messages for input items (reasoning items are dropped)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append(_chat_message(item))
        elif kind in CALLS:
            name = chat_name(item["name"], item.get("namespace"))
            if kind == "function_call":
                arguments = item["arguments"]
            else:
                arguments = json.dumps({"input": item["input"]})
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in OUTPUTS:
            content = _tool_output(item["output"])
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
    return messages


def _chat_message(item: Item) -> dict[str, Any]:
    role, parts = item["role"], item["content"]
    if role in ("system", "developer"):
        return {"role": "system", "content": "".join(p["text"] for p in parts)}
    if role == "assistant":
        text = "".join(p.get("text") or p.get("refusal") or "" for p in parts)
        return {"role": "assistant", "content": text}
    return {"role": "user", "content": _user_parts(parts)}


def _user_parts(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and parts[0]["type"] == "input_text":
        return parts[0]["text"]
    out: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "input_text":
            out.append({"type": "text", "text": part["text"]})
        elif part["type"] == "input_image":
            image = {"url": part["image_url"], "detail": part.get("detail") or "auto"}
            out.append({"type": "image_url", "image_url": image})
        else:
            file = {k: part[k] for k in ("file_data", "filename") if k in part}
            out.append({"type": "file", "file": file})
    return out


def _tool_output(output: str | list[Any]) -> str | list[dict[str, Any]]:
    if isinstance(output, str):
        return output
    parts = [_part(p, "user", "output") for p in output]
    if all(p["type"] == "input_text" for p in parts):
        return "".join(p["text"] for p in parts)
    return _user_parts(parts)  # type: ignore[return-value]
