"""PriceBook: exact Decimal costs, matching, override order, one warning per unknown model."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest

from mitmroute.config import Deployment
from mitmroute.exchange import Usage
from mitmroute.money.pricing import PriceBook, PriceError


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load()


def dep(**kw) -> Deployment:
    base = dict(model_name="g", provider="openai", model="gpt-4o", litellm_model="openai/gpt-4o",
                api_base="https://api.openai.com/v1")  # fmt: skip
    base.update(kw)
    return Deployment(**base)


def test_gpt_4o_with_cached_prompt_tokens_is_exact(book: PriceBook) -> None:
    usage = Usage(prompt_tokens=1234, cached_tokens=1000, completion_tokens=56)
    # 234 uncached x $2.50/M + 1000 cached x $1.25/M + 56 output x $10/M
    expected = Decimal(234) * Decimal("2.5") / 10**6 + Decimal(1000) * Decimal("1.25") / 10**6
    expected += Decimal(56) * Decimal(10) / 10**6
    cost = book.cost("openai", "gpt-4o", usage)
    assert cost == expected == Decimal("0.002395")
    assert isinstance(cost, Decimal)


def test_anthropic_cache_write_and_read_rates(book: PriceBook) -> None:
    usage = Usage(prompt_tokens=3000, cached_tokens=1000, cache_creation_tokens=1500,
                  completion_tokens=200)  # fmt: skip
    # opus 4: $15/M in, $75/M out, $1.50/M cache read, $18.75/M cache write
    expected = (500 * Decimal("15") + 1000 * Decimal("1.5") + 1500 * Decimal("18.75")
                + 200 * Decimal("75")) / 10**6  # fmt: skip
    assert book.cost("anthropic", "claude-opus-4-20250514", usage) == expected


@pytest.mark.parametrize(
    ("provider", "model", "same_as"),
    [
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "openai/gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("openai", "o3-mini-2025-01-31", "o3-mini"),
        ("openai", "gpt-5-2025-08-07", "gpt-5"),
        ("anthropic", "claude-opus-4-0", "claude-opus-4-20250514"),
        ("anthropic", "claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("anthropic", "anthropic/claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-3-7-sonnet-latest", "claude-3-7-sonnet-20250219"),
        ("anthropic", "claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("bedrock", "us.anthropic.claude-sonnet-4-20250514-v1:0", "claude-sonnet-4"),
    ],
)
def test_prefix_and_date_insensitive_matching(
    book: PriceBook, provider: str, model: str, same_as: str
) -> None:
    rates = book.rates(provider, model)
    assert rates is not None and rates == book.rates("", same_as)


def test_exact_dated_entry_beats_the_undated_one(book: PriceBook) -> None:
    old, new = book.rates("openai", "gpt-4o-2024-05-13"), book.rates("openai", "gpt-4o")
    assert old and new and old.input == Decimal("0.000005") != new.input


def test_local_providers_cost_zero(book: PriceBook) -> None:
    usage = Usage(prompt_tokens=10_000, completion_tokens=5_000)
    assert book.cost("ollama", "llama3.1:8b", usage) == 0
    assert book.cost("ollama_chat", "qwen2.5", usage) == 0


def test_embeddings_priced_on_input_only(book: PriceBook) -> None:
    usage = Usage(prompt_tokens=1_000_000)
    assert book.cost("openai", "text-embedding-3-small", usage) == Decimal("0.02")
    assert book.cost("openai", "text-embedding-3-large", usage) == Decimal("0.13")


def test_deployment_override_wins_and_floats_become_exact_decimals(book: PriceBook) -> None:
    d = dep(input_cost_per_token=0.000001, output_cost_per_token=0.000003)
    usage = Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=100)
    # cache rates left out fall back to the deployment's own input rate, not the table's
    assert book.cost("openai", "gpt-4o", usage, d) == Decimal("0.0013")
    d2 = dep(input_cost_per_token=0.0000001, cache_read_input_token_cost=0.00000001)
    got = book.cost("openai", "gpt-4o", usage, d2)  # output from the table ($10/M)
    assert got == 600 * Decimal("1e-7") + 400 * Decimal("1e-8") + 100 * Decimal("1e-5")


def test_user_price_file_beats_builtin(tmp_path: Path, book: PriceBook) -> None:
    f = tmp_path / "prices.yaml"
    f.write_text(
        "models:\n"
        "  gpt-4o: {input_cost_per_token: '0.000001', output_cost_per_token: 0.000002}\n"
        "  hosted_vllm/my-model: {input_cost_per_token: 0.0000005, output_cost_per_token: 0}\n"
    )
    custom = PriceBook.load(f)
    usage = Usage(prompt_tokens=100, completion_tokens=10)
    assert custom.cost("openai", "gpt-4o", usage) == Decimal("0.00012")
    assert custom.cost("hosted_vllm", "my-model", usage) == Decimal("0.00005")
    assert custom.cost("openai", "gpt-4o-mini", usage) == book.cost("openai", "gpt-4o-mini", usage)
    j = tmp_path / "prices.json"
    acme = {"input_cost_per_token": "1e-6", "output_cost_per_token": "2e-6"}
    j.write_text(json.dumps({"models": {"acme/*": acme}}))
    assert PriceBook.load(j).cost("acme", "anything", usage) == Decimal("0.00012")


def test_bad_price_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"models": {"x": {"input_cost_per_token": "cheap"}}}))
    with pytest.raises(PriceError, match="input_cost_per_token"):
        PriceBook.load(f)
    with pytest.raises(PriceError, match="cannot read"):
        PriceBook.load(tmp_path / "missing.json")


def test_unknown_model_is_none_with_a_single_warning(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook.load()
    caplog.set_level(logging.WARNING, logger="mitmroute.money.pricing")
    for _ in range(5):
        assert book.cost("openai", "mystery-model", Usage(prompt_tokens=5)) is None
    assert book.cost("groq", "another", Usage(prompt_tokens=5)) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "mystery-model" in warnings[0].getMessage()


def test_builtin_table_covers_the_required_models(book: PriceBook) -> None:
    required = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3",
                "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano",
                "text-embedding-3-small", "text-embedding-3-large", "claude-opus-4-20250514",
                "claude-opus-4-1-20250805", "claude-sonnet-4-20250514",
                "claude-sonnet-4-5-20250929", "claude-3-5-haiku-20241022",
                "claude-3-7-sonnet-20250219", "claude-haiku-4-5-20251001"]  # fmt: skip
    for model in required:
        rates = book.rates("", model)
        assert rates is not None, model
        assert rates.input and rates.input > 0 and rates.output is not None, model
        assert rates.cache_read is not None and rates.cache_read <= rates.input, model


def test_an_embedding_deployment_priced_only_by_input_is_priced_not_null():
    from mitmroute.config import parse_config
    from mitmroute.money import Pricing

    config = parse_config(
        {
            "model_list": [
                {
                    "model_name": "embed",
                    "litellm_params": {
                        "model": "openai/house-embedder",
                        "api_base": "http://127.0.0.1:9/v1",
                        "input_cost_per_token": 0.0000001,
                    },
                }
            ]
        }
    )
    deployment = config.deployments[0]
    pricing = Pricing.for_config(config)
    cost = pricing.cost("openai", "house-embedder", Usage(prompt_tokens=1000), deployment)
    assert cost == Decimal("0.0001")
    # an unknown output rate still leaves a completion unpriced: it would multiply tokens
    assert pricing.cost("openai", "house-embedder", Usage(10, 5), deployment) is None


def test_one_price_book_per_config():
    from mitmroute.config import parse_config
    from mitmroute.money import Pricing

    config = parse_config({})
    assert Pricing.for_config(config) is Pricing.for_config(config)
    assert Pricing.for_config(parse_config({})) is not Pricing.for_config(config)


def test_remembered_rates_belong_to_the_deployment_asked_about(book: PriceBook) -> None:
    """The book remembers merged rates per deployment: two deployments of one model with
    different overrides keep their own prices however often and in whatever order asked."""
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    cheap = dep(input_cost_per_token=0.000001, output_cost_per_token=0.000002)
    dear = dep(input_cost_per_token=0.00001, output_cost_per_token=0.00002)
    for _ in range(3):
        assert book.cost("openai", "gpt-4o", usage, cheap) == Decimal("0.0012")
        assert book.cost("openai", "gpt-4o", usage, dear) == Decimal("0.012")
        assert book.cost("openai", "gpt-4o", usage) == Decimal("0.0035")  # the built-in table
