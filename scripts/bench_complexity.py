#!/usr/bin/env python3
"""How well, how cheaply and how fast the complexity router routes a labeled prompt set.

    python scripts/bench_complexity.py                       # the table in the README
    python scripts/bench_complexity.py --prompts mine.yaml   # your own labeled prompts
    python scripts/bench_complexity.py --config config.yaml --router auto --by-category

Prompts: YAML or JSONL entries with `label` (easy | hard), `prompt` or `messages`, optional
`tools: true`, `category` and `id` (tests/data/complexity_prompts.yaml is the format).

Reported, per router:
* accuracy: "hard" means routed to COMPLEX or REASONING, "easy" to SIMPLE or MEDIUM (the cheap
  tiers of the seed's config), over all prompts and over the labeled set's two halves (`dev`,
  on which the default weights were tuned, and the held-out `test`; split by crc32 of the id);
  hard->cheap (quality at risk) and easy->frontier (money wasted) counted apart;
* the share of requests per tier;
* cost against all-frontier: every prompt priced on its tier's group and on the baseline group
  (mitmroute.money, the first deployment of each group), with prompt tokens counted as the
  proxy counts them and `--output-tokens` (default 300) completion tokens for every request on
  both sides. The same tokens everywhere is the honest simplification: real answers differ in
  length between models, and tokenizers differ. The "oracle" row routes by the labels;
* classifier time per request, p50/p99 over the prompt set and over long prompts (a 50 KB and a
  288 KB ask, a 300-turn agent conversation with a 50 KB system prompt and 12 tools), and the
  whole decision (override, classifier, session record) as the engine runs it.

Without `--config`, two routers are built from the seed's own configs (tests/data), loaded
unchanged plus one `auto_router/complexity_router` entry: "basic" (SIMPLE/MEDIUM -> local-qwen
on Ollama, COMPLEX/REASONING -> claude-opus-4) and "production" (local-qwen-32b, gpt-4o,
claude-sonnet, claude-opus).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import zlib
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mitmroute.config import RouterConfig, load_config, parse_config  # noqa: E402
from mitmroute.exchange import Exchange, Usage  # noqa: E402
from mitmroute.money import Pricing  # noqa: E402
from mitmroute.request import ClientRequest, now_utc  # noqa: E402
from mitmroute.routing.complexity import COMPLEX, TIERS, ComplexityClassifier  # noqa: E402
from mitmroute.routing.complexity_router import ComplexityRouters  # noqa: E402
from mitmroute.spend import estimate_prompt_tokens  # noqa: E402

DATA = ROOT / "tests" / "data"
SEED_ENV = {"OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "x", "LITELLM_MASTER_KEY": "x"}
SEED_ROUTERS = {
    "basic": (
        "litellm-basic.yaml",
        {
            "SIMPLE": "local-qwen",
            "MEDIUM": "local-qwen",
            "COMPLEX": "claude-opus-4",
            "REASONING": "claude-opus-4",
        },
        "claude-opus-4",
    ),
    "production": (
        "litellm-production.yaml",
        {
            "SIMPLE": "local-qwen-32b",
            "MEDIUM": "gpt-4o",
            "COMPLEX": "claude-sonnet",
            "REASONING": "claude-opus",
        },
        "claude-opus",
    ),
}


def load_prompts(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        entries = yaml.safe_load(text)
    for i, e in enumerate(entries):
        e.setdefault("id", f"prompt-{i}")
        e.setdefault("category", "-")
        if e.get("label") not in ("easy", "hard"):
            raise SystemExit(f"{path}: entry {e['id']}: label must be easy or hard")
        e["split"] = "dev" if zlib.crc32(str(e["id"]).encode()) % 2 == 0 else "test"
    return entries


def body_of(entry: dict[str, Any], model: str) -> dict[str, Any]:
    messages = entry.get("messages") or [{"role": "user", "content": entry["prompt"]}]
    body: dict[str, Any] = {"model": model, "messages": messages}
    if entry.get("tools"):
        body["tools"] = [{"type": "function", "function": {"name": "tool", "parameters": {}}}]
    return body


def seed_router(name: str) -> RouterConfig:
    file, tiers, default = SEED_ROUTERS[name]
    raw = yaml.safe_load((DATA / file).read_text())
    raw["model_list"].append(
        {
            "model_name": "auto",
            "litellm_params": {
                "model": "auto_router/complexity_router",
                "complexity_router_default_model": default,
                "complexity_router_config": {"classifier_type": "heuristic", "tiers": tiers},
            },
        }
    )
    return parse_config(raw, environ=SEED_ENV, source=f"{file} + auto router")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Any, repeat: int, cpu: list[float] | None = None) -> list[float]:
    """Wall microseconds per call (and CPU microseconds into `cpu`: on a loaded machine a wall
    p99 is mostly the scheduler's, a few ms of waiting for a core)."""
    fn()
    out = []
    for _ in range(repeat):
        started, spent = time.perf_counter(), time.thread_time()
        fn()
        out.append((time.perf_counter() - started) * 1e6)
        if cpu is not None:
            cpu.append((time.thread_time() - spent) * 1e6)
    return out


def long_bodies() -> dict[str, dict[str, Any]]:
    code = "def handler(event):\n    return process(event)  # see the design notes\n"
    question = "\nWhy does this leak memory under load? Explain the root cause."
    agent: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent. " * 2000}]
    agent += [
        {"role": "user" if i % 2 else "assistant", "content": f"turn {i} " * 50} for i in range(300)
    ]
    return {
        "50 KB ask": {"messages": [{"role": "user", "content": code * 700 + question}]},
        "288 KB ask": {"messages": [{"role": "user", "content": code * 4000 + question}]},
        "agent, 300 turns": {
            "messages": agent,
            "tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(12)],
        },
    }


def evaluate(
    config: RouterConfig, router: str, prompts: list[dict[str, Any]], args: Any, accuracy: bool
) -> None:
    settings = config.complexity_routers[router]
    classifier = ComplexityClassifier(settings.classifier)
    pricing = Pricing.for_config(config)
    groups = config.groups()
    baseline = groups[settings.baseline][0]

    def price(group: str, usage: Usage) -> Decimal:
        d = groups[group][0]
        return pricing.cost(d.provider, d.model, usage, d) or Decimal(0)

    rows = []
    for e in prompts:
        body = body_of(e, router)
        verdict = classifier.classify(body)
        usage = Usage(estimate_prompt_tokens(body, baseline.model), args.output_tokens)
        hard = e["label"] == "hard"
        # the router with its easy/hard mistakes fixed: easy on SIMPLE, hard on its own
        # choice of COMPLEX or REASONING (COMPLEX when it chose a cheap tier)
        oracle = settings.groups[max(verdict.tier, COMPLEX) if hard else 0]
        rows.append(
            {
                **e,
                "tier": verdict.tier,
                "right": (verdict.tier >= COMPLEX) == hard,
                "cost": price(settings.groups[verdict.tier], usage),
                "frontier": price(settings.baseline, usage),
                "oracle": price(oracle, usage),
            }
        )

    print(f"\n## {router}: {config.source}\n")
    print("| tier | group |\n|---|---|")
    for tier, group in zip(TIERS, settings.groups, strict=True):
        print(f"| {tier} | {group} |")
    print(f"\nbaseline (all-frontier): {settings.baseline}")

    if accuracy:
        classification(rows, args)
    cost_table(rows, args)


def classification(rows: list[dict[str, Any]], args: Any) -> None:
    print("\n| prompts | n | accuracy | hard -> cheap | easy -> frontier |")
    print("|---|---|---|---|---|")
    for name, part in (
        ("all", rows),
        ("dev (tuned on)", [r for r in rows if r["split"] == "dev"]),
        ("test (held out)", [r for r in rows if r["split"] == "test"]),
    ):
        if not part:
            continue
        missed = sum(1 for r in part if r["label"] == "hard" and r["tier"] < COMPLEX)
        wasted = sum(1 for r in part if r["label"] == "easy" and r["tier"] >= COMPLEX)
        acc = sum(r["right"] for r in part) / len(part)
        print(f"| {name} | {len(part)} | {acc:.1%} | {missed} | {wasted} |")

    shares = Counter(TIERS[r["tier"]] for r in rows)
    print("\n| tier | share |\n|---|---|")
    for tier in TIERS:
        print(f"| {tier} | {shares[tier] / len(rows):.1%} |")

    if args.by_category:
        per: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            per[r["category"]].append(r["right"])
        print("\n| category | n | accuracy |\n|---|---|---|")
        for cat, marks in sorted(per.items()):
            print(f"| {cat} | {len(marks)} | {sum(marks) / len(marks):.0%} |")


def cost_table(rows: list[dict[str, Any]], args: Any) -> None:
    frontier = sum(r["frontier"] for r in rows)
    print(
        f"\n| cost of the {len(rows)} prompts, {args.output_tokens} output tokens each | USD |",
        end="",
    )
    print(" vs all-frontier |\n|---|---|---|")
    for name, key in (
        ("all-frontier (baseline)", "frontier"),
        ("routed", "cost"),
        ("routed, easy/hard mistakes fixed", "oracle"),
    ):
        total = sum(r[key] for r in rows)
        share = f"{total / frontier:.1%}" if frontier else "-"
        print(f"| {name} | {total:.4f} | {share} |")


def timings(config: RouterConfig, router: str, prompts: list[dict[str, Any]], repeat: int) -> None:
    classifier = ComplexityClassifier(config.complexity_routers[router].classifier)
    samples: list[float] = []
    cpu: list[float] = []
    for e in prompts:
        body = body_of(e, router)
        samples += timed(lambda b=body: classifier.classify(b), repeat, cpu)
    print("\n| classifier time per request | p50 | p99 | CPU p99 |\n|---|---|---|---|")

    def line(name: str, wall: list[float], cpu: list[float]) -> None:
        p50, p99, c99 = statistics.median(wall), percentile(wall, 0.99), percentile(cpu, 0.99)
        print(f"| {name} | {p50:.0f} us | {p99:.0f} us | {c99:.0f} us |")

    line(f"the {len(prompts)} prompts (x{repeat})", samples, cpu)
    for name, body in long_bodies().items():
        cpu = []
        line(name, timed(lambda b=body: classifier.classify(b), max(repeat * 10, 200), cpu), cpu)

    routers = ComplexityRouters(config, Pricing.for_config(config))
    loop = asyncio.new_event_loop()
    decision: list[float] = []
    cpu = []
    for i, e in enumerate(prompts):
        body = body_of(e, router)
        request = ClientRequest(
            "POST", "/v1/chat/completions", {"x-session-id": f"s{i % 20}"}, b"", {}
        )

        async def route(b: dict[str, Any] = body, r: ClientRequest = request) -> None:
            await routers.route(router, r, b, "chat/completions", Exchange("x", now_utc(), ""))

        decision += timed(lambda c=route: loop.run_until_complete(c()), repeat, cpu)
    loop.close()
    line("whole decision: override, classifier, session (in-process)", decision, cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=DATA / "complexity_prompts.yaml")
    parser.add_argument("--config", type=Path, help="a config.yaml with a complexity router")
    parser.add_argument("--router", default="auto", help="its model name (default: auto)")
    parser.add_argument("--output-tokens", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per prompt")
    parser.add_argument("--by-category", action="store_true")
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts)
    labels = Counter(e["label"] for e in prompts)
    print(
        f"# complexity router: {len(prompts)} prompts ({labels['easy']} easy, "
        f"{labels['hard']} hard) from {args.prompts.name}"
    )
    if args.config:
        configs = [(load_config(args.config), args.router)]
    else:
        configs = [(seed_router(name), "auto") for name in SEED_ROUTERS]
    shown = None
    for config, router in configs:
        if router not in config.complexity_routers:
            raise SystemExit(f"{config.source}: no complexity router named {router!r}")
        settings = config.complexity_routers[router].classifier
        evaluate(config, router, prompts, args, accuracy=settings != shown)
        shown = settings
    timings(configs[0][0], configs[0][1], prompts, args.repeat)


if __name__ == "__main__":
    main()
