"""What redacting backend secrets costs per non-streamed answer and per streamed chunk.

Usage: python scripts/bench_redaction.py [--secrets 1,5,20,50]
Times `Redactor.bytes` on a 1 KB and a 16 KB answer body, and `LineRedactor.feed` on one SSE
chunk, when no secret occurs (the common case); best of 5 runs, nanoseconds per call.
"""

from __future__ import annotations

import argparse
import json
import secrets
import timeit
from collections.abc import Callable

from mitmroute.secrets import LineRedactor, Redactor

PREFIXES = ("sk-proj-", "sk-ant-api03-", "gsk_", "", "xai-", "hf_")
TEXT = "The quick brown fox jumps over the lazy dog. "


def body(size: int) -> bytes:
    message = {"role": "assistant", "content": (TEXT * (size // len(TEXT) + 1))[:size]}
    return json.dumps({"id": "chatcmpl-1", "choices": [{"index": 0, "message": message}]}).encode()


def chunk() -> bytes:
    delta = {"index": 0, "delta": {"content": " word"}, "finish_reason": None}
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [delta],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def ns(call: Callable[[bytes], object], data: bytes, number: int) -> float:
    """Nanoseconds per `call(data)`, best of 5."""
    return min(timeit.repeat(lambda: call(data), number=number, repeat=5)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", default="1,5,20,50")
    counts = [int(n) for n in parser.parse_args().secrets.split(",")]
    small, large, event = body(1000), body(16000), chunk()
    print(f"| secrets | 1 KB answer | 16 KB answer | {len(event)} B chunk (line-buffered) |")
    print("|---|---|---|---|")
    for n in counts:
        keys = [f"{PREFIXES[i % len(PREFIXES)]}{secrets.token_urlsafe(30)}" for i in range(n)]
        redactor, lines = Redactor(keys), LineRedactor(Redactor(keys))
        print(
            f"| {n} | {ns(redactor.bytes, small, 20000):,.0f} ns "
            f"| {ns(redactor.bytes, large, 5000):,.0f} ns "
            f"| {ns(lines.feed, event, 20000):,.0f} ns |"
        )


if __name__ == "__main__":
    main()
