"""Messages requests: every field the proxy reads is checked (a 400 naming it, as Anthropic
would answer), and the body is translated into the engine's language, an OpenAI chat completion.

The translation serves deployments that don't speak Messages (OpenAI-compatible, Ollama); an
`anthropic/` deployment gets the client's body itself (see `mitmroute.request.NativeRequest`).
What only Messages can say (server tools, documents, containers, MCP servers, ...) is listed in
`Translation.untranslatable`: such a request is served by an anthropic deployment or refused.

- `system` (a string or text blocks) -> a leading system message; text blocks are joined by a
  blank line, `cache_control` (a hint) is dropped.
- user turns: text -> content (a string when it is all text), `image` (base64 or url) ->
  `image_url` parts, a `text` document -> text, `tool_result` -> `tool` messages placed first
  (`is_error` prefixes "Error: "; images in a result follow in a user message).
- assistant turns: text -> content, `tool_use` -> `tool_calls`; `thinking` and
  `redacted_thinking` are dropped (their signatures mean nothing elsewhere).
- `max_tokens` -> `max_completion_tokens`; `stop_sequences` -> `stop`; `temperature`,
  `top_p`, `top_k` kept; `metadata.user_id` -> `user`; `stream` -> `stream` with
  `stream_options.include_usage` (usage comes back in `message_delta`).
- `tools` (custom tools) -> function tools; `tool_choice` auto/any/tool/none ->
  auto/required/function/none, `disable_parallel_tool_use` -> `parallel_tool_calls: false`.
- `thinking` enabled -> `reasoning_effort` by budget (< 4096 low, < 16384 medium, else high);
  `output_config.effort` -> `reasoning_effort`; `output_config.format` (json_schema) ->
  `response_format`. `reasoning_effort`, `top_k`, `max_completion_tokens` and `user` are
  optional (`OPTIONAL`): a backend that refuses them is asked again without those it names
  (all of them when it names none).
- hints with no equivalent are dropped: `cache_control`, `context_management`, `service_tier`,
  `inference_geo`, `speed`, `diagnostics`, tool `strict`; so are fields this proxy doesn't know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mitmroute import errors
from mitmroute.errors import ProxyError

Block = dict[str, Any]
Message = dict[str, Any]

EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high", "minimal": "low"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}
NATIVE_ONLY = ("container", "mcp_servers")
"""Top-level fields only an anthropic deployment can honour (when set)."""
OPTIONAL = ("reasoning_effort", "top_k", "max_completion_tokens", "user")
"""Translated parameters a backend may refuse: it is asked again without them (a model that
doesn't reason refuses `reasoning_effort`, OpenAI's API `top_k`, gpt-4o a `max_tokens` above
16384, which Claude Code asks for; Messages needs a `max_tokens`, chat completions don't)."""


def invalid(where: str, message: str) -> ProxyError:
    """Anthropic's 400 for a field of the wrong shape, naming it as the API does."""
    return errors.bad_request(f"{where}: {message}", param=where)


@dataclass(frozen=True, slots=True)
class Translation:
    """A checked Messages request and its chat-completions translation."""

    chat: dict[str, Any]
    untranslatable: tuple[str, ...] = ()
    """What the chat translation can't carry: only an anthropic deployment may serve it."""
    stop_sequences: tuple[str, ...] = ()
    stream: bool = False

    @property
    def optional(self) -> tuple[str, ...]:
        """The parameters of `chat` a backend may do without."""
        return tuple(p for p in OPTIONAL if p in self.chat)


def effort_for_budget(budget: int) -> str:
    """The `reasoning_effort` closest to a thinking budget in tokens."""
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def translate(body: dict[str, Any], *, count_only: bool = False) -> Translation:
    """Check a Messages (or, `count_only`, a count_tokens) body and translate it.

    Raises ProxyError (400 invalid_request_error) for a field of the wrong shape."""
    return _Translator(count_only).run(body)


@dataclass(slots=True)
class _Translator:
    count_only: bool
    untranslatable: list[str] = field(default_factory=list)

    def native_only(self, what: str) -> None:
        self.untranslatable.append(what)

    # --- top level ------------------------------------------------------------------------

    def run(self, body: dict[str, Any]) -> Translation:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("model", "Field required: a non-empty string")
        chat: dict[str, Any] = {"model": model}
        messages = self.system(body.get("system"))
        messages += self.messages(body.get("messages"))
        if all(m["role"] == "system" for m in messages):
            # Nothing of the conversation translates (a PDF alone, say): an anthropic deployment
            # still serves it; the chat request only has to be well-formed.
            messages.append({"role": "user", "content": ""})
        chat["messages"] = messages
        if not self.count_only or "max_tokens" in body:
            chat["max_completion_tokens"] = _required_integer(body, "max_tokens")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise invalid("stream", "Input should be a valid boolean")
        if stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        for key in ("temperature", "top_p"):
            if (value := _number(body, key, 0.0, 1.0)) is not None:
                chat[key] = value
        if (top_k := _integer(body, "top_k")) is not None:
            chat["top_k"] = top_k
        stops = self.stop_sequences(body.get("stop_sequences"))
        if stops:
            chat["stop"] = list(stops)
        if user := self.user(body.get("metadata")):
            chat["user"] = user
        self.tools(body, chat)
        self.reasoning(body, chat)
        for key in NATIVE_ONLY:
            if body.get(key):
                self.native_only(f"`{key}`")
        return Translation(chat, tuple(self.untranslatable), stops, bool(stream))

    def system(self, system: Any) -> list[Message]:
        if system is None or system == "":
            return []
        if isinstance(system, str):
            return [{"role": "system", "content": system}]
        if not isinstance(system, list):
            raise invalid("system", "Input should be a valid string or a list of text blocks")
        texts = []
        for i, block in enumerate(system):
            if _type(block, f"system.{i}") != "text":
                raise invalid(f"system.{i}.type", "only text blocks are allowed in system")
            texts.append(_text(block, f"system.{i}"))
        return [{"role": "system", "content": "\n\n".join(texts)}] if texts else []

    def stop_sequences(self, stops: Any) -> tuple[str, ...]:
        if stops is None:
            return ()
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("stop_sequences", "Input should be a list of strings")
        return tuple(stops)

    def user(self, metadata: Any) -> str | None:
        if metadata is None:
            return None
        if not isinstance(metadata, dict):
            raise invalid("metadata", "Input should be an object")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise invalid("metadata.user_id", "Input should be a valid string")
        return user or None

    # --- messages -------------------------------------------------------------------------

    def messages(self, messages: Any) -> list[Message]:
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", "Field required: a non-empty list of messages")
        out: list[Message] = []
        for i, message in enumerate(messages):
            where = f"messages.{i}"
            if not isinstance(message, dict):
                raise invalid(where, "Input should be an object with a role and content")
            role = message.get("role")
            if role not in ("user", "assistant", "system"):
                raise invalid(f"{where}.role", "Input should be 'user', 'assistant' or 'system'")
            blocks = _blocks(message.get("content"), f"{where}.content")
            if role == "system":  # Claude Code sends these mid-conversation (a beta)
                out.append(self.system_turn(blocks, f"{where}.content"))
            elif role == "user":
                out += self.user_turn(blocks, f"{where}.content")
            elif turn := self.assistant_turn(blocks, f"{where}.content"):
                out.append(turn)
        return out

    def system_turn(self, blocks: list[Block], where: str) -> Message:
        texts = []
        for j, block in enumerate(blocks):
            if _type(block, f"{where}.{j}") != "text":
                raise invalid(f"{where}.{j}.type", "A system turn holds text blocks only")
            texts.append(_text(block, f"{where}.{j}"))
        return {"role": "system", "content": "\n\n".join(texts)}

    def user_turn(self, blocks: list[Block], where: str) -> list[Message]:
        results: list[Message] = []
        parts: list[Block] = []
        for j, block in enumerate(blocks):
            at = f"{where}.{j}"
            kind = _type(block, at)
            if kind == "text":
                parts.append({"type": "text", "text": _text(block, at)})
            elif kind == "image":
                if (part := self.image(block, at)) is not None:
                    parts.append(part)
            elif kind == "document":
                if (text := self.document(block, at)) is not None:
                    parts.append({"type": "text", "text": text})
            elif kind == "tool_result":
                message, images = self.tool_result(block, at)
                results.append(message)
                parts[:0] = images  # a result's images go first, right after the results
            else:
                self.native_only(f"`{kind}` blocks ({at})")
        if not parts:
            return results
        if all(p["type"] == "text" for p in parts):
            return [*results, {"role": "user", "content": "\n\n".join(p["text"] for p in parts)}]
        return [*results, {"role": "user", "content": parts}]

    def assistant_turn(self, blocks: list[Block], where: str) -> Message | None:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            at = f"{where}.{j}"
            kind = _type(block, at)
            if kind == "text":
                texts.append(_text(block, at))
            elif kind == "tool_use":
                calls.append(_tool_call(block, at))
            elif kind == "thinking":
                _string(block, "thinking", at)
            elif kind != "redacted_thinking":
                self.native_only(f"`{kind}` blocks ({at})")
        if not texts and not calls:
            return None
        message: Message = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            message["tool_calls"] = calls
        return message

    def image(self, block: Block, where: str) -> Block | None:
        source = block.get("source")
        if not isinstance(source, dict):
            raise invalid(f"{where}.source", "Field required: an image source object")
        kind = source.get("type")
        if kind == "base64":
            media = _string(source, "media_type", f"{where}.source")
            data = _string(source, "data", f"{where}.source")
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
        if kind == "url":
            url = _string(source, "url", f"{where}.source")
            return {"type": "image_url", "image_url": {"url": url}}
        self.native_only(f"`{kind}` image sources ({where}.source)")
        return None

    def document(self, block: Block, where: str) -> str | None:
        source = block.get("source")
        if not isinstance(source, dict):
            raise invalid(f"{where}.source", "Field required: a document source object")
        if source.get("type") == "text":
            text = _string(source, "data", f"{where}.source")
            title = block.get("title")
            return f"{title}\n\n{text}" if isinstance(title, str) and title else text
        self.native_only(f"`{source.get('type')}` documents ({where})")
        return None

    def tool_result(self, block: Block, where: str) -> tuple[Message, list[Block]]:
        call_id = _string(block, "tool_use_id", where)
        is_error = block.get("is_error")
        if is_error is not None and not isinstance(is_error, bool):
            raise invalid(f"{where}.is_error", "Input should be a valid boolean")
        content = block.get("content")
        texts: list[str] = []
        images: list[Block] = []
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            for k, inner in enumerate(_blocks(content, f"{where}.content")):
                at = f"{where}.content.{k}"
                kind = _type(inner, at)
                if kind == "text":
                    texts.append(_text(inner, at))
                elif kind == "image":
                    if (part := self.image(inner, at)) is not None:
                        images.append(part)
                elif kind == "document" and (text := self.document(inner, at)) is not None:
                    texts.append(text)
                elif kind != "document":
                    self.native_only(f"`{kind}` blocks in tool results ({at})")
        text = "\n\n".join(texts)
        if is_error:
            text = f"Error: {text}" if text else "Error"
        if images:
            note = {"type": "text", "text": f"(images returned by tool call {call_id})"}
            images = [note, *images]
        return {"role": "tool", "tool_call_id": call_id, "content": text}, images

    # --- tools and reasoning ----------------------------------------------------------------

    def tools(self, body: dict[str, Any], chat: dict[str, Any]) -> None:
        tools = body.get("tools")
        if tools is None:
            tools = []
        if not isinstance(tools, list):
            raise invalid("tools", "Input should be a list of tools")
        functions = []
        for i, tool in enumerate(tools):
            where = f"tools.{i}"
            if not isinstance(tool, dict):
                raise invalid(where, "Input should be an object")
            kind = tool.get("type")
            if kind not in (None, "custom"):
                self.native_only(f"server tool `{kind}` ({where})")
                continue
            fn: dict[str, Any] = {"name": _string(tool, "name", where)}
            if tool.get("description") is not None:
                fn["description"] = _string(tool, "description", where)
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise invalid(f"{where}.input_schema", "Field required: a JSON schema object")
            fn["parameters"] = schema
            functions.append({"type": "function", "function": fn})
        choice = body.get("tool_choice")
        if choice is None:
            if functions:
                chat["tools"] = functions
            return
        if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
            raise invalid("tool_choice", "Input should be an object with a type")
        kind = choice["type"]
        parallel = choice.get("disable_parallel_tool_use")
        if parallel is not None and not isinstance(parallel, bool):
            raise invalid("tool_choice.disable_parallel_tool_use", "Input should be a boolean")
        if kind == "tool":
            name = _string(choice, "name", "tool_choice")
            chat_choice: Any = {"type": "function", "function": {"name": name}}
        elif kind in CHOICES:
            chat_choice = CHOICES[kind]
        else:
            raise invalid("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")
        if functions:  # OpenAI refuses a tool_choice without tools
            chat["tools"] = functions
            chat["tool_choice"] = chat_choice
            if parallel and kind != "none":
                chat["parallel_tool_calls"] = False

    def reasoning(self, body: dict[str, Any], chat: dict[str, Any]) -> None:
        thinking = body.get("thinking")
        if thinking is not None:
            if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
                raise invalid("thinking", "Input should be an object with a type")
            if thinking["type"] == "enabled":
                budget = _required_integer(thinking, "budget_tokens", where="thinking")
                chat["reasoning_effort"] = effort_for_budget(budget)
        config = body.get("output_config")
        if config is None:
            return
        if not isinstance(config, dict):
            raise invalid("output_config", "Input should be an object")
        effort = config.get("effort")
        if effort is not None:
            if not isinstance(effort, str):
                raise invalid("output_config.effort", "Input should be a valid string")
            if effort in EFFORTS:
                chat["reasoning_effort"] = EFFORTS[effort]
        fmt = config.get("format")
        if fmt is None:
            return
        if not isinstance(fmt, dict):
            raise invalid("output_config.format", "Input should be an object")
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            self.native_only("`output_config.format` other than a json_schema")
            return
        schema = {"name": "output", "schema": fmt["schema"]}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}


# --- small checks ----------------------------------------------------------------------------


def _blocks(content: Any, where: str) -> list[Block]:
    """A message's content as blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(where, "Input should be a valid string or a list of content blocks")
    return content


def _type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise invalid(f"{where}.type", "Field required: each content block needs a type")
    return block["type"]


def _text(block: Block, where: str) -> str:
    return _string(block, "text", where)


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key}", "Input should be a valid string")
    return value


def _integer(obj: dict[str, Any], key: str, *, where: str = "") -> int | None:
    """A non-negative integer field, None when absent."""
    path = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(path, "Input should be a valid non-negative integer")
    return value


def _required_integer(obj: dict[str, Any], key: str, *, where: str = "") -> int:
    value = _integer(obj, key, where=where)
    if value is None:
        raise invalid(f"{where}.{key}" if where else key, "Field required")
    return value


def _number(obj: dict[str, Any], key: str, low: float, high: float) -> float | int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(key, f"Input should be a number between {low:g} and {high:g}")
    return value


def _tool_call(block: Block, where: str) -> dict[str, Any]:
    call_id = _string(block, "id", where)
    name = _string(block, "name", where)
    arguments = block.get("input")
    if not isinstance(arguments, dict):
        raise invalid(f"{where}.input", "Input should be an object")
    fn = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"id": call_id, "type": "function", "function": fn}
