"""The threat list: a backend's secrets never reach a client, a log line or the spend log, and a
client's key never reaches a backend it was not meant for.

Each test runs a real mitmdump (debug log level, so the log says as much as it can) with the
official openai SDK against fake backends that quote back the key they were sent, then looks
for the key in the client's error or answer, the mitmdump log and every spend-log row.
"""

from __future__ import annotations

import base64

import duckdb
import openai
import pytest

from tests.conftest import Proxy, deployment, free_port
from tests.fakes.anthropic_server import FakeAnthropic

BACKEND_KEY = "sk-proj-backendSECRET0123456789abcdefWXYZ"
OTHER_KEY = "sk-proj-otherSECRET9876543210fedcbaQRST"
CLIENT_KEY = "sk-client-SECRET-4242424242424242"
ANTHROPIC_KEY = "sk-ant-api03-anthropicSECRET-0123456789"
MSG = [{"role": "user", "content": "hello there"}]
DEBUG = ["--set", "termlog_verbosity=debug"]


def start(start_proxy, model_list: list[dict], **general) -> Proxy:
    return start_proxy(
        {
            "model_list": model_list,
            "router_settings": {"num_retries": 0},
            "general_settings": general,
        },
        extra_args=DEBUG,
    )


def leaks(proxy: Proxy, secret: str) -> list[str]:
    """Where `secret` got to on the proxy's side: the log file, spend-log tables, spill files."""
    proxy.stop()  # flushes the spend log and releases the DuckDB file
    found = []
    for path in proxy.workdir.rglob("*"):
        if not path.is_file() or path.name == "config.yaml" or ".duckdb" in path.name:
            continue
        if secret.encode() in path.read_bytes():
            found.append(path.name)
    with duckdb.connect(str(proxy.spend_db), read_only=True) as con:
        tables = [
            t for (t,) in con.execute("select table_name from information_schema.tables").fetchall()
        ]
        for table in tables:
            if secret in repr(con.execute(f'select * from "{table}"').fetchall()):
                found.append(f"spend db table {table}")
    assert tables, "the spend log was not written"
    return found


def client_error(proxy: Proxy, model: str, **kwargs) -> openai.APIStatusError:
    with proxy.client(**kwargs) as client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, messages=MSG)
    return info.value


# --- a backend quoting its key back --------------------------------------------------------------


def test_backend_key_quoted_in_an_error_reaches_neither_client_nor_logs(start_proxy, backend):
    proxy = start(
        start_proxy,
        [deployment("gpt-4o", "openai/leaky-401", f"{backend.url}/v1", api_key=BACKEND_KEY)],
    )
    error = client_error(proxy, "gpt-4o")
    assert error.status_code == 401
    assert "Incorrect API key provided: Bearer sk-proj-...WXYZ" in error.message
    assert BACKEND_KEY not in error.message and BACKEND_KEY not in error.response.text
    assert leaks(proxy, BACKEND_KEY) == []


def test_backend_keys_quoted_by_every_deployment_stay_out_of_the_tried_summary(
    start_proxy, backend
):
    proxy = start(
        start_proxy,
        [
            deployment("gpt-4o", "openai/leaky-500", f"{backend.url}/v1", api_key=BACKEND_KEY),
            deployment("gpt-4o", "openai/leaky-503", f"{backend.url}/v1", api_key=OTHER_KEY),
        ],
    )
    error = client_error(proxy, "gpt-4o")
    assert error.status_code == 503
    assert "No deployment of `gpt-4o` could answer. Tried:" in error.message
    assert error.message.count("Incorrect API key provided") == 2
    for key in (BACKEND_KEY, OTHER_KEY):
        assert key not in error.response.text
        assert key not in proxy.logs()
    assert leaks(proxy, BACKEND_KEY) == [] and leaks(proxy, OTHER_KEY) == []


def test_api_base_credentials_quoted_in_an_error_are_redacted(start_proxy, backend):
    """userinfo in api_base goes upstream as `Authorization: Basic ...`: a backend quoting
    that header back must not hand the password to the client."""
    password = "url-password-SECRET-123"
    host = backend.url.removeprefix("http://")
    api_base = f"http://svc:{password}@{host}/v1"
    proxy = start(start_proxy, [deployment("gpt-4o", "openai/leaky-401", api_base)])
    basic = base64.b64encode(f"svc:{password}".encode()).decode()
    error = client_error(proxy, "gpt-4o")
    assert error.status_code == 401 and "Incorrect API key provided: Basic" in error.message
    assert basic not in error.response.text and password not in error.response.text
    assert leaks(proxy, basic) == [] and leaks(proxy, password) == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_backend_key_in_a_successful_answer_is_redacted(start_proxy, backend, stream):
    proxy = start(
        start_proxy,
        [deployment("gpt-4o", "openai/leaky-echo", f"{backend.url}/v1", api_key=BACKEND_KEY)],
    )
    with proxy.client() as client:
        if stream:
            chunks = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(model="gpt-4o", messages=MSG)
            text = answer.choices[0].message.content or ""
    assert text == "echo: sk-proj-...WXYZ"
    assert leaks(proxy, BACKEND_KEY) == []


def test_backend_key_in_a_mid_stream_error_event_is_redacted(start_proxy, backend):
    proxy = start(
        start_proxy,
        [deployment("gpt-4o", "openai/leaky-break", f"{backend.url}/v1", api_key=BACKEND_KEY)],
    )
    received = []
    with proxy.client() as client, pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "".join(filter(None, received)) == "echo: hello"  # the error came mid-stream
    assert info.value.message == "stream failed for key Bearer sk-proj-...WXYZ"
    assert BACKEND_KEY not in str(info.value.body)
    assert leaks(proxy, BACKEND_KEY) == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_anthropic_key_quoted_back_is_redacted(start_proxy, stream):
    with FakeAnthropic(api_key=ANTHROPIC_KEY) as claude:
        proxy = start(
            start_proxy,
            [
                deployment(
                    "gpt-4o", "anthropic/claude-opus-4", claude.base_url, api_key=ANTHROPIC_KEY
                )
            ],
        )
        messages = [{"role": "user", "content": "leak key"}]
        with proxy.client() as client, pytest.raises(openai.APIError) as info:
            answer = client.chat.completions.create(
                model="gpt-4o", messages=messages, stream=stream
            )
            for _ in answer if stream else ():
                pass
        assert claude.requests[-1].headers["x-api-key"] == ANTHROPIC_KEY
    assert "sk-ant-...6789" in info.value.message
    assert ANTHROPIC_KEY not in str(info.value.body)
    assert leaks(proxy, ANTHROPIC_KEY) == []


# --- a client's key and where it may go ----------------------------------------------------------


def test_client_key_forwarded_to_the_host_it_addressed_stays_out_of_logs(start_proxy, backend):
    """A keyless deployment at exactly the origin the client addressed gets the client's key;
    when that backend quotes it back, the proxy's log and spend log still never hold it."""
    proxy = start(
        start_proxy,
        [deployment("gpt-4o", "openai/leaky-401", f"{backend.url}/v1")],
        intercept_hosts=["127.0.0.1"],
    )
    error = client_error(proxy, "gpt-4o", api_key=CLIENT_KEY, base_url=f"{backend.url}/v1")
    assert backend.state.headers[-1]["authorization"] == f"Bearer {CLIENT_KEY}"
    assert error.status_code == 401 and CLIENT_KEY not in error.response.text
    assert leaks(proxy, CLIENT_KEY) == []


@pytest.mark.parametrize("addressed", ["another port", "another scheme"])
def test_client_key_never_reaches_a_keyless_deployment_on_another_origin(
    start_proxy, backend, addressed
):
    """Same host name is not enough: the client's key was for its own scheme, host and port."""
    port = backend.url.rsplit(":", 1)[1]
    base_url = {
        "another port": f"http://127.0.0.1:{free_port()}/v1",
        "another scheme": f"https://127.0.0.1:{port}/v1",
    }[addressed]
    proxy = start(
        start_proxy,
        [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1")],
        intercept_hosts=["127.0.0.1"],
    )
    with proxy.client(api_key=CLIENT_KEY, base_url=base_url) as client:
        answer = client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert answer.choices[0].message.content == "echo: hello there"
    assert backend.state.requests[-1]["messages"] == MSG
    assert "authorization" not in backend.state.headers[-1]
