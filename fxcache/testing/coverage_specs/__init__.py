"""Tiny-config overrides of :mod:`fxcache.testing.coverage`, by class name — used only to *build* test models
(configs whose defaults are huge or inconsistent, inputs a generic rule cannot guess). One table, kept in parts
by diffusers module family."""

from fxcache.testing.coverage import Spec
from fxcache.testing.coverage_specs import a_d, e_k, l_q, r_z

SPECS: dict[str, Spec] = {**a_d.SPECS, **e_k.SPECS, **l_q.SPECS, **r_z.SPECS}

__all__ = ["SPECS"]
