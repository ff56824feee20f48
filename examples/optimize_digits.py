"""Calibrated plan search on the bundled trained digits model: print the candidates and the chosen plan.

    python examples/optimize_digits.py --speedup 3
    python examples/optimize_digits.py --tolerance 0.05
"""

import argparse
import logging
import time

import fxcache
from fxcache.testing.digits import digits_model, digits_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float)
    parser.add_argument("--tolerance", type=float)
    parser.add_argument("--steps", type=int, default=20)
    a = parser.parse_args()
    model, sampler = digits_model(), digits_sampler(steps=a.steps)
    calib = [{"label": c, "seed": 100 + c} for c in (1, 4, 7)]
    start = time.time()
    opt = fxcache.optimize(model, calib, sampler=sampler, speedup=a.speedup, tolerance=a.tolerance, progress=False)
    logging.getLogger("optimize_digits").info("%s\n\n%.1f s", opt.search_report(), time.time() - start)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxcache").setLevel(logging.WARNING)
    main()
