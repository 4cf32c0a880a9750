"""Threat: a request to an intercepted host slips past the router.

Each case was reproduced against the old code: the path spellings went to the original host
unrouted (no key check, no spend row), a deeply nested body or a bad `stream_options` was a
500, a 256 MB gzip bomb was inflated in memory. Here the "original host" is a recording server
on loopback (`intercept_hosts: [127.0.0.1]`): anything it sees went out unrouted.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator

import brotli
import duckdb
import pytest

from mitmroute.gate import BadPath, canonical_path, decide
from tests.conftest import deployment, free_port
from tests.fakes.origin import Origin

SPELLINGS = [
    "//v1/chat/completions",
    "/V1/chat/completions",
    "/v1/%2e/chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1/chat/completions/",
    "/v1/./chat/../chat/completions",
    "/v1//chat///completions",
    "/%76%31/chat/completions",
    "/v1/CHAT/Completions",
    "/x/../v1/chat/completions",
    "/../../v1/chat/completions",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_a_route_is_that_route(spelling):
    assert canonical_path(spelling) == "/v1/chat/completions"
    assert decide("POST", spelling, "api.openai.com").fate == "route"


def test_the_query_string_is_kept_as_sent():
    assert canonical_path("//V1/chat/completions?a=%2F") == "/v1/chat/completions?a=%2F"


@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat%252Fcompletions",  # double encoding
        "/v1/chat/completions;x=1",
        "/v1/chat/completions%3Fx",
        "/v1\\chat\\completions",
        "/v1/chat/completions%00",
        "/v1/ch%C3%A4t/completions",
        "/v1/chat/completions%20",
        "v1/chat/completions",
        "*",
    ],
)
def test_a_path_without_a_canonical_form_is_refused_not_passed_through(target):
    with pytest.raises(BadPath):
        canonical_path(target)
    decision = decide("POST", target, "api.openai.com")
    assert decision.fate == "refuse" and decision.error is not None
    assert decision.error.status == 400


def test_paths_outside_the_passthrough_rule_are_refused():
    assert decide("GET", "/v1/files", "api.openai.com").fate == "passthrough"
    assert decide("GET", "/admin", "api.openai.com").fate == "refuse"
    assert decide("GET", "/v1/files", "api.openai.com", passthrough_paths=()).fate == "refuse"
    assert decide("GET", "/v1/models", "api.openai.com").fate == "answer"
    assert decide("POST", "/key/generate", "api.openai.com").fate == "answer"
    ws = decide("GET", "/v1/responses", "api.openai.com", websocket=True)
    assert ws.fate == "refuse" and ws.error is not None and ws.error.status == 426


# --- through a real mitmdump ----------------------------------------------------------------


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gated(start_proxy, backend, origin):
    """A proxy that intercepts 127.0.0.1 (the origin stand-in) and routes `gpt-4o`."""

    def start(**general):
        return start_proxy(
            {
                "model_list": [
                    deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1", api_key="sk-b")
                ],
                "general_settings": {
                    "intercept_hosts": ["127.0.0.1"],
                    "passthrough_unknown_models": False,
                    **general,
                },
            }
        )

    return start


def chat(model: str = "gpt-4o", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def spend_rows(proxy, sql: str) -> list[tuple]:
    proxy.stop()
    with duckdb.connect(str(proxy.spend_db), read_only=True) as con:
        return con.execute(sql).fetchall()


def raw_request(proxy, origin: Origin, target: str, body: bytes, headers: dict[str, str]) -> bytes:
    """Send one request with exactly this target (no client-side normalisation)."""
    port = origin.url.rsplit(":", 1)[1]
    head = [f"POST http://127.0.0.1:{port}{target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall("\r\n".join(head).encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def status_and_json(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, json.loads(body) if body.strip() else {}


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def test_path_spellings_are_routed_and_logged_never_sent_to_the_original_host(gated, origin):
    proxy = gated()
    body = json.dumps(chat()).encode()
    headers = {"Authorization": "Bearer sk-app", "Content-Type": "application/json"}
    for spelling in SPELLINGS[:4]:
        status, answer = status_and_json(raw_request(proxy, origin, spelling, body, headers))
        assert status == 200, (spelling, answer)
        assert answer["choices"][0]["message"]["content"] == "echo: hello"
    assert origin.seen == [], Origin.describe(origin.seen)
    logged = spend_rows(proxy, "select endpoint, deployment, status_code from spend_log")
    assert logged == [("chat/completions", "openai/ok-model", 200)] * 4


def test_a_path_outside_the_rule_is_refused_in_openai_shape_and_logged(gated, origin):
    proxy = gated(passthrough_paths=["/v1/files*"])
    for target in ("/admin", "/v1/assistants", "/v1/chat%252Fcompletions"):
        status, answer = status_and_json(raw_request(proxy, origin, target, b"{}", {}))
        assert status in (400, 404) and answer["error"]["type"] == "invalid_request_error"
    status, answer = status_and_json(raw_request(proxy, origin, "/v1/files", b"{}", {}))
    assert status == 200 and answer["object"] == "origin"  # the rule lets this one pass
    assert [s.path for s in origin.seen] == ["/v1/files"]
    logged = spend_rows(proxy, "select status_code from spend_log order by status_code")
    assert sorted(r[0] for r in logged) == [200, 400, 404, 404]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(stream_options="x"), "stream_options"),
        (chat(stream_options=[1]), "stream_options"),
        (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
        (chat(stream="true"), "stream"),
        (chat(user=5), "user"),
        (chat(messages="hi"), "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_a_wrongly_typed_parameter_is_a_400_naming_it(gated, origin, body, param):
    proxy = gated()
    with proxy.http() as http:
        resp = http.post(f"{origin.url}/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert origin.seen == []


def test_a_deeply_nested_body_is_a_400_not_a_500(gated, origin):
    proxy = gated()
    deep = '{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "x": '
    deep += "[" * 5000 + "]" * 5000 + "}"
    with proxy.http() as http:
        resp = http.post(
            f"{origin.url}/v1/chat/completions",
            content=deep,
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "body_too_deep"
    assert origin.seen == []


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_gzip_bomb_is_refused_without_inflating_it(gated, origin):
    proxy = gated(max_request_size_mb=1)
    bomb = gzip.compress(b" " * (256 << 20), compresslevel=9)
    with proxy.http() as http:
        http.get(f"{origin.url}/v1/models")  # warm up
        before = _peak_rss_mb(proxy.proc.pid)
        resp = http.post(
            f"{origin.url}/v1/chat/completions",
            content=bomb,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert _peak_rss_mb(proxy.proc.pid) - before < 40  # the body inflated to 256 MB before
    assert origin.seen == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_within_the_limit_is_routed(gated, origin, encoding):
    proxy = gated()
    raw = json.dumps(chat()).encode()
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[encoding]
    with proxy.http() as http:
        resp = http.post(
            f"{origin.url}/v1/chat/completions",
            content=packed(raw),
            headers={"content-type": "application/json", "content-encoding": encoding},
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: hello"


def test_a_body_over_the_limit_is_a_413_before_it_is_read(gated, origin):
    proxy = gated(max_request_size_mb=0.01)
    with proxy.http() as http:
        resp = http.post(f"{origin.url}/v1/chat/completions", json=chat(pad="x" * 20_000))
        unknown = http.post(
            f"{origin.url}/v1/chat/completions",
            content=b"{}",
            headers={"content-encoding": "zstd"},
        )
    assert resp.status_code == 413
    assert unknown.status_code == 415
    assert origin.seen == []


def test_a_websocket_upgrade_is_refused_at_once(gated, origin):
    proxy = gated()
    with proxy.http() as http:
        resp = http.get(
            f"{origin.url}/v1/responses",
            headers={"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
                     "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="},
        )  # fmt: skip
    assert resp.status_code == 426
    assert origin.seen == []


def test_a_host_spelled_with_capitals_or_a_trailing_dot_is_still_intercepted(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [
                deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1", api_key="sk-b")
            ],
            "general_settings": {"passthrough_unknown_models": False},
        }
    )
    with proxy.http(headers={"host": "API.OpenAI.com."}) as http:
        resp = http.post("https://api.openai.com/v1/chat/completions", json=chat())
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-mitmroute-deployment"] == "openai/ok-model"


def test_stream_large_bodies_is_refused_at_start_up(start_proxy, backend):
    """Streaming a request body would send it to the original host before it is routed."""
    try:
        proxy = start_proxy(
            {"model_list": [deployment("m", "openai/ok-model", f"{backend.url}/v1")]},
            extra_args=["--set", "stream_large_bodies=1k"],
        )
    except RuntimeError as e:  # it may exit before it ever listens
        assert "stream_large_bodies" in str(e)
        return
    assert proxy.proc.wait(15) == 2
    assert "mitmroute: stream_large_bodies=1k" in proxy.logs()


def test_a_host_spelling_does_not_skip_the_key_check(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [
                deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1", api_key="sk-b")
            ],
            "general_settings": {"master_key": "sk-master"},
        }
    )
    with proxy.http(headers={"host": "API.OpenAI.com."}) as http:
        resp = http.post("https://api.openai.com/v1/chat/completions", json=chat())
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_an_unreachable_original_host_is_an_error_in_the_clients_shape_not_an_html_page(
    gated, start_proxy, backend
):
    proxy = gated()
    closed = free_port()  # nothing listens here: the original host is down
    with proxy.http() as http:
        openai_style = http.get(f"http://127.0.0.1:{closed}/v1/files")
        anthropic_style = http.get(f"http://127.0.0.1:{closed}/v1/messages/batches")
    assert openai_style.status_code == 502
    assert openai_style.json()["error"]["code"] == "upstream_unreachable"
    assert anthropic_style.status_code == 502
    assert anthropic_style.json()["type"] == "error"
    assert anthropic_style.json()["error"]["type"] == "api_error"
    logged = spend_rows(proxy, "select endpoint, status_code, error_type from spend_log")
    assert sorted(logged) == [
        ("files", 502, "upstream_unreachable"),
        ("messages/batches", 502, "upstream_unreachable"),
    ]


def test_a_passed_through_answer_arrives_unchanged_and_is_logged(gated, origin):
    proxy = gated()
    with proxy.http() as http:
        resp = http.post(f"{origin.url}/v1/files?purpose=x", content=b"abc",
                         headers={"authorization": "Bearer sk-app", "x-custom": "1"})  # fmt: skip
    assert resp.status_code == 200 and resp.headers["x-origin"] == "1"
    assert resp.json() == {"object": "origin", "path": "/v1/files?purpose=x"}
    seen = origin.seen[0]
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/files?purpose=x", b"abc")
    assert seen.headers["Authorization"] == "Bearer sk-app"  # the rule: unchanged, key included
    assert seen.headers["x-custom"] == "1"
    logged = spend_rows(proxy, "select endpoint, deployment, status_code from spend_log")
    assert logged == [("files", "passthrough/files", 200)]


def test_a_remembered_canonical_path_refuses_a_bad_target_every_time() -> None:
    """canonical_path is remembered per target: a good one answers the same each time; a bad
    one raises each time (an exception is never remembered as an answer)."""
    for _ in range(3):
        assert canonical_path("/V1//chat/./completions?x=1") == "/v1/chat/completions?x=1"
        with pytest.raises(BadPath):
            canonical_path("/v1/chat/%ff")
        with pytest.raises(BadPath):
            canonical_path("/v1/chat;x/completions")
        long = "/v1/" + "a/" * 200 + "../" * 200 + "chat/completions"  # too long to remember
        assert canonical_path(long + "?q=" + "x" * 5000) == "/v1/chat/completions?q=" + "x" * 5000
