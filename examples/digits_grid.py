"""Draw digits 0-9 with the bundled trained model, uncached and with a cache method, side by side.

    python examples/digits_grid.py --method TaylorSeer --out digits.png
"""

import argparse
import logging

import torch

import fxcache
from fxcache import methods
from fxcache.testing.digits import digits_model, digits_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="TaylorSeer", help="a class of fxcache.methods (default arguments)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="digits.png")
    a = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = digits_model()
    sampler = digits_sampler(steps=a.steps)
    opt = fxcache.optimize(model, [{"label": c, "seed": 100 + c} for c in range(3)], sampler=sampler,
                           method=getattr(methods, a.method)(), progress=False)
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
    psnrs = []
    with torch.no_grad():
        for c in range(10):
            ref = sampler(model, {"label": c, "seed": c})
            got = sampler(opt, {"label": c, "seed": c})
            psnrs.append(float(10 * torch.log10(4.0 / (got - ref).pow(2).mean())))
            for row, img in enumerate((ref, got)):
                axes[row, c].imshow(img[0, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
                axes[row, c].axis("off")
    stats = opt.stats()
    fig.suptitle(f"top: uncached {a.steps} steps; bottom: {a.method}, computed fraction "
                 f"{stats['computed_fraction']:.2f}, mean PSNR {sum(psnrs) / len(psnrs):.1f} dB", fontsize=9)
    fig.savefig(a.out, dpi=100)
    logging.getLogger("digits_grid").info("wrote %s (computed fraction %.3f, mean PSNR %.2f dB)", a.out,
                                          stats["computed_fraction"], sum(psnrs) / len(psnrs))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxcache").setLevel(logging.WARNING)
    main()
