"""Money: what a request costs, computed in one place (pricing.py), in exact Decimal dollars."""

from mitmroute.money.pricing import PriceBook, PriceError, Pricing, Rates

__all__ = ["PriceBook", "PriceError", "Pricing", "Rates"]
