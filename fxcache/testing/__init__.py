"""Helpers shipped for tests and examples: a zoo of tiny real diffusers denoisers (random weights)."""

from fxcache.testing import zoo

__all__ = ["zoo"]
