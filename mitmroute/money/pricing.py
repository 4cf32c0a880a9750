"""What a request cost, in exact Decimal dollars.

Rates come, field by field, from (first wins):

1. the deployment's own ``input_cost_per_token`` / ``output_cost_per_token`` /
   ``cache_read_input_token_cost`` / ``cache_creation_input_token_cost`` (config.yaml);
2. the user's price file (``general_settings.price_file``, JSON or YAML, same shape as
   ``prices.json`` beside this module);
3. the built-in ``prices.json``.

A key is ``model``, ``provider/model`` (that provider only) or ``provider/*`` (every model of a
provider, e.g. ``ollama/*`` at 0). Models match ignoring a provider prefix, a trailing date
(``-20250514``, ``-2024-08-06``, ``-0613``), ``-latest`` / ``-0`` / Bedrock ``-v1:0`` suffixes,
and ``.`` vs ``-`` (``gpt-4.1`` == ``gpt-4-1``). A cache rate left out falls back to the input
rate of the same entry (so a deployment priced at 0 is 0 for cached tokens too).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation, localcontext
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from mitmroute.config import Deployment, RouterConfig
    from mitmroute.exchange import Usage

log = logging.getLogger(__name__)

FIELDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
)
_CONTEXT = Context(prec=40)
_DATE = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2}|\d{4})$")
_SUFFIX = re.compile(r"(-v\d+(:\d+)?|:\d+|-latest|-0)$")
_VENDOR = re.compile(r"^([a-z]{2}\.)?(anthropic|openai)\.")
MERGED_MEMO_SIZE = 4096
"""Merged rates a price book remembers, per (provider, model, deployment); then it starts over."""


class PriceError(ValueError):
    """A malformed price table or price file."""


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token; None where unknown (cache rates then fall back to the input rate)."""

    input: Decimal | None = None
    output: Decimal | None = None
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None

    def over(self, base: Rates | None) -> Rates:
        """These rates, with gaps filled from `base`."""
        if base is None:
            return self
        return Rates(
            input=self.input if self.input is not None else base.input,
            output=self.output if self.output is not None else base.output,
            cache_read=self.cache_read if self.cache_read is not None else base.cache_read,
            cache_write=self.cache_write if self.cache_write is not None else base.cache_write,
        )

    def completed(self) -> Rates:
        """Cache rates left out default to this entry's own input rate."""
        if self.input is None:
            return self
        return Rates(
            input=self.input,
            output=self.output,
            cache_read=self.cache_read if self.cache_read is not None else self.input,
            cache_write=self.cache_write if self.cache_write is not None else self.input,
        )

    @property
    def complete(self) -> bool:
        return self.input is not None and self.output is not None

    def cost(self, usage: Usage) -> Decimal:
        """Exact cost of `usage`; requires input and output rates."""
        assert self.input is not None and self.output is not None
        cached = max(usage.cached_tokens, 0)
        written = max(usage.cache_creation_tokens, 0)
        uncached = max(usage.prompt_tokens - cached - written, 0)
        read_rate = self.cache_read if self.cache_read is not None else self.input
        write_rate = self.cache_write if self.cache_write is not None else self.input
        with localcontext(_CONTEXT):
            return (
                uncached * self.input
                + cached * read_rate
                + written * write_rate
                + max(usage.completion_tokens, 0) * self.output
            )


def _decimal(value: Any, where: str) -> Decimal | None:
    """A price from a string/int/float (floats via their shortest repr, never binary)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise PriceError(f"{where}: not a price: {value!r}")
    try:
        d = Decimal(str(value).strip()) if isinstance(value, str | int | float) else None
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or d < 0:
        raise PriceError(f"{where}: not a price: {value!r}")
    return d


def _rates(entry: Any, where: str) -> Rates:
    if not isinstance(entry, dict):
        raise PriceError(f"{where}: expected a mapping of {', '.join(FIELDS)}")
    unknown = set(entry) - set(FIELDS)
    if unknown:
        raise PriceError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return Rates(*(_decimal(entry.get(f), f"{where}.{f}") for f in FIELDS)).completed()


def canonical(model: str) -> str:
    """Lower-case, no provider/vendor prefix, '.' -> '-' (the exact-match key)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return _VENDOR.sub("", name).replace(".", "-")


def _stripped(name: str) -> str:
    """`canonical` name without version/date suffixes (the fuzzy key)."""
    prev = None
    while prev != name:
        prev = name
        name = _SUFFIX.sub("", name)
        name = _DATE.sub("", name)
    return name


class PriceTable:
    """One parsed price table: exact, stripped and provider-wide keys."""

    def __init__(self, models: dict[str, Rates]):
        self.exact: dict[tuple[str, str], Rates] = {}
        self.fuzzy: dict[tuple[str, str], Rates] = {}
        self.provider_wide: dict[str, Rates] = {}
        for key, rates in models.items():
            provider, sep, model = key.partition("/")
            if not sep:
                provider, model = "", key
            provider = provider.lower()
            if model == "*":
                self.provider_wide[provider] = rates
                continue
            self.exact.setdefault((provider, canonical(model)), rates)
            self.fuzzy.setdefault((provider, _stripped(canonical(model))), rates)

    @classmethod
    def parse(cls, doc: Any, where: str) -> PriceTable:
        if not isinstance(doc, dict):
            raise PriceError(f"{where}: expected a mapping with a 'models' key")
        models = doc.get("models", doc if "models" not in doc else None)
        if not isinstance(models, dict):
            raise PriceError(f"{where}.models: expected a mapping")
        parsed = {
            str(k): _rates(v, f"{where}.models.{k}")
            for k, v in models.items()
            if not str(k).startswith("_")
        }
        return cls(parsed)

    def lookup(self, provider: str, model: str) -> Rates | None:
        provider = (provider or "").lower()
        name = canonical(model)
        short = _stripped(name)
        for table, key in (
            (self.exact, (provider, name)),
            (self.exact, ("", name)),
            (self.fuzzy, (provider, short)),
            (self.fuzzy, ("", short)),
        ):
            if key in table:
                return table[key]
        return self.provider_wide.get(provider)


def _read_doc(path: Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() in {".yaml", ".yml"}:
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def _deployment_rates(deployment: Deployment | None) -> Rates | None:
    if deployment is None:
        return None
    values = [getattr(deployment, f, None) for f in FIELDS]
    if all(v is None for v in values):
        return None
    where = f"deployment {deployment.litellm_model}"
    rates = Rates(*(_decimal(v, f"{where}.{f}") for f, v in zip(FIELDS, values, strict=True)))
    return rates.completed()


class PriceBook:
    """Deployment overrides, then the user's price file, then the built-in table."""

    def __init__(self, tables: list[PriceTable]):
        self._tables = tables
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str, int], tuple[Deployment | None, Rates]] = {}
        """Merged rates by (provider, model, id(deployment)): the tables never change."""

    @classmethod
    def builtin(cls) -> PriceTable:
        text = resources.files("mitmroute.money").joinpath("prices.json").read_text()
        return PriceTable.parse(json.loads(text), "prices.json")

    @classmethod
    def load(cls, price_file: str | Path | None = None) -> PriceBook:
        """The built-in table, under `price_file` (JSON or YAML) when given."""
        tables = [cls.builtin()]
        if price_file:
            path = Path(price_file)
            try:
                doc = _read_doc(path)
            except OSError as e:
                raise PriceError(f"{path}: cannot read: {e.strerror}") from None
            except (ValueError, ImportError) as e:
                raise PriceError(f"{path}: cannot parse: {e}") from None
            tables.insert(0, PriceTable.parse(doc, str(path)))
        return cls(tables)

    def rates(
        self, provider: str, model: str, deployment: Deployment | None = None
    ) -> Rates | None:
        """The merged rates for this request, or None when input/output rates are unknown."""
        merged = self._merged(provider, model, deployment)
        return merged if merged.complete else None

    def _merged(self, provider: str, model: str, deployment: Deployment | None) -> Rates:
        """`_merge`, remembered: every request of a deployment asks the same question."""
        key = (provider, model, id(deployment))
        known = self._memo.get(key)
        if known is not None and known[0] is deployment:
            return known[1]
        merged = self._merge(provider, model, deployment)
        if len(self._memo) >= MERGED_MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = (deployment, merged)  # holds the deployment: its id stays its own
        return merged

    def _merge(self, provider: str, model: str, deployment: Deployment | None) -> Rates:
        merged = _deployment_rates(deployment) or Rates()
        if deployment is not None:
            provider = provider or deployment.provider
            model = model or deployment.model
        for table in self._tables:
            if merged.complete and merged.cache_read is not None and merged.cache_write is not None:
                break
            merged = merged.over(table.lookup(provider, model))
        return merged

    def cost(
        self, provider: str, model: str, usage: Usage, deployment: Deployment | None = None
    ) -> Decimal | None:
        """Exact USD cost of `usage`, or None (and one warning per model) when unpriced.

        A rate that is unknown but multiplies no tokens (the output rate of an embedding
        deployment priced only by `input_cost_per_token`) does not leave the cost unknown."""
        rates = self._merged(provider, model, deployment)
        if rates.input is not None and rates.output is None and usage.completion_tokens == 0:
            rates = Rates(rates.input, Decimal(0), rates.cache_read, rates.cache_write)
        if not rates.complete:
            key = ((provider or "").lower(), model or "")
            if key not in self._warned:
                with self._lock:
                    if key not in self._warned:
                        self._warned.add(key)
                        log.warning(
                            "spend: no price for %s/%s; cost left empty (set "
                            "input_cost_per_token/output_cost_per_token on the deployment or "
                            "add it to general_settings.price_file)",
                            provider,
                            model,
                        )
            return None
        return rates.cost(usage)


class Pricing:
    """The one place a request's cost is computed, for one config: its price book (loaded
    once) and its deployments. The engine sets `exchange.cost_usd` with it; budgets, metrics,
    alerts and the ledger read that value and price nothing themselves."""

    _cache: ClassVar[dict[int, tuple[RouterConfig, Pricing]]] = {}

    def __init__(self, config: RouterConfig) -> None:
        self.book = PriceBook.load(config.general.price_file)
        self.deployments = {(d.litellm_model, d.api_base): d for d in config.deployments}

    @classmethod
    def for_config(cls, config: RouterConfig) -> Pricing:
        """The Pricing of `config`, shared by everything that prices for it."""
        cached = cls._cache.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        pricing = cls(config)
        if len(cls._cache) >= 8:
            cls._cache.clear()
        cls._cache[id(config)] = (config, pricing)
        return pricing

    def cost(
        self, provider: str, model: str, usage: Usage, deployment: Deployment | None = None
    ) -> Decimal | None:
        return self.book.cost(provider, model, usage, deployment)

    def rates(self, deployment: Deployment) -> tuple[Decimal, Decimal]:
        """A deployment's (input, output) USD per token, 0 where unknown (for estimates)."""
        rates = self.book._merged(deployment.provider, deployment.model, deployment)
        return rates.input or Decimal(0), rates.output or Decimal(0)
