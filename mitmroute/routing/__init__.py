"""Routing: the plan a request follows (plan: next deployment, wait, or stop; failed,
succeeded), what routing keeps between requests (state: cooldowns, per-minute limits, in-flight
counts, latencies, shared through Redis where LiteLLM shares them), and which healthy deployment
of a group takes an attempt (picker, strategy: `router_settings.routing_strategy`)."""
