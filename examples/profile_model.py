"""Profile a tiny zoo model: print the report, write the heatmap and save the profile.

    python examples/profile_model.py                       # DiT, flow-matching Euler, CFG in two calls
    python examples/profile_model.py flux --steps 12 --cfg none --out /tmp/flux-profile
"""

import argparse
import logging
import os

import fxcache
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="dit", choices=zoo.names())
    parser.add_argument("--sampler", default="euler", choices=["euler", "ddim"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cfg", default="separate", choices=["none", "separate", "batched"])
    parser.add_argument("--prompts", type=int, default=3, help="number of calibration prompts")
    parser.add_argument("--sensitivity", type=int, default=12, help="measured re-runs")
    parser.add_argument("--out", default="fxcache-profile")
    a = parser.parse_args()

    model, _ = zoo.build(a.model)
    sampler = zoo_sampler(a.model, kind=a.sampler, steps=a.steps, cfg=a.cfg)
    prof = fxcache.profile(model, list(range(a.prompts)), sampler=sampler, sensitivity=a.sensitivity)
    os.makedirs(a.out, exist_ok=True)
    prof.save(a.out)
    png = prof.plot(os.path.join(a.out, "profile.png"))
    logging.getLogger("profile_model").info("%s\n\nprofile saved to %s, heatmap %s", prof.report(), a.out, png)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxcache").setLevel(logging.WARNING)
    main()
