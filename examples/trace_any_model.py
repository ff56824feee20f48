"""Capture a denoiser with fxcache.trace and print what it discovered.

    python examples/trace_any_model.py            # every model of the tiny zoo
    python examples/trace_any_model.py flux unet2d_condition
"""

import logging
import sys

import torch

import fxcache
from fxcache.testing import zoo

log = logging.getLogger("trace_any_model")


def main(names: list[str]) -> None:
    for name in names or zoo.names():
        model, inputs = zoo.build(name)
        traced = fxcache.trace(model, inputs)
        with torch.no_grad():
            ref, out = model(**inputs).sample, traced(**inputs).sample
        log.info("== %s (%s, captured with %s)\n%s\nmax |traced - eager| = %.2e\n", name, type(model).__name__,
                 traced.capture_strategy, traced.structure.summary(), (ref - out).abs().max().item())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxcache").setLevel(logging.WARNING)
    main(sys.argv[1:])
