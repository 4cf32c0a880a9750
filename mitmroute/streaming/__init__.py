"""Streaming: the SSE wire format, chunk assembly, and the loopback relay to clients."""
