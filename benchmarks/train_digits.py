"""Train the bundled reference models on scikit-learn's handwritten digits (1797 images, 8×8, 10 classes):

* ``--model flux`` (default): a small class-conditional FLUX-architecture transformer (diffusers
  ``FluxTransformer2DModel``, the class diffusers' cache hooks and cache-dit support), FLUX's rectified-flow objective;
* ``--model dit``: a small class-conditional ``DiTTransformer2DModel`` (adaLN-zero, patch 2), DDPM ε-prediction with
  diffusers' default linear noise schedule — a second architecture *and* a second sampler family (DDIM).

    python benchmarks/train_digits.py                  # ~9 min on 2 CPU cores; writes out/train_digits/
    python benchmarks/train_digits.py --model dit      # ~12 min
    python benchmarks/train_digits.py --steps 200 --out /tmp/digits   # a short run: weights that sample roughly
    python benchmarks/train_digits.py --steps 3 --batch 8 --log-every 1   # smoke

Weights go to ``--out`` (default ``out/train_digits``, under the current directory; created), each file written
atomically. The bundled weights in ``fxcache/assets/`` are only ever replaced on request:
``--out fxcache/assets`` (the tests' golden values depend on them).

The DiT model uses its own null class (label 10, dropped 10 % of the time by DiT's label embedding in training mode)
for classifier-free guidance.

"Prompts" are class labels: label c is encoded as fixed random text tokens ``text_table[c]`` (4 × 32) and a pooled
vector ``pooled_table[c]`` (stored with the weights); row 10 is the empty prompt (zeros), used 10 % of the time in
training so classifier-free guidance works. Images are packed FLUX-style: 2×2 patches of the 1-channel 8×8 image →
16 tokens of 4 channels. x_t = (1 − t)·image + t·noise, target v = noise − image, t logit-normal as in SD3/FLUX.
The bundled weights (~1 MB, safetensors, EMA) are committed, so tests and the demo never train.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from fxcache.testing.digits import CONFIG, DIT_CONFIG, TEXT_TOKENS, dit_scheduler, make_tables, pack, position_ids

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, beside this script
from common import HelpFormatter, positive_int

log = logging.getLogger("train_digits")


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    return images, torch.tensor(data.target, dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", choices=("flux", "dit"), default="flux", help="architecture to train")
    parser.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps")
    parser.add_argument("--batch", type=positive_int, default=256, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (data order, noise, initial weights)")
    parser.add_argument("--log-every", type=positive_int, default=250, help="log the loss every this many steps")
    parser.add_argument("--out", default=os.path.join("out", "train_digits"),
                        help="output directory, created (relative to the current directory); "
                             "--out fxcache/assets replaces the bundled weights")
    a = parser.parse_args(argv)

    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(a.seed)
    images, labels = load_digits()
    text_table, pooled_table = make_tables(seed=1234)
    img_ids, txt_ids = position_ids()
    if a.model == "flux":
        model = FluxTransformer2DModel(**CONFIG)
    else:
        model = DiTTransformer2DModel(**DIT_CONFIG).train()  # training mode: DiT drops 10 % of labels itself
        alphas = dit_scheduler().alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(images), (a.batch,))
        if a.model == "flux":
            x0, y = pack(images[idx]), labels[idx].clone()
            y[torch.rand(a.batch) < 0.1] = 10  # the empty prompt
            noise = torch.randn_like(x0)
            t = torch.sigmoid(torch.randn(a.batch))
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            pred = model(hidden_states=xt, encoder_hidden_states=text_table[y], pooled_projections=pooled_table[y],
                         timestep=t, img_ids=img_ids, txt_ids=txt_ids).sample
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
        else:
            x0, y = images[idx], labels[idx]
            noise = torch.randn_like(x0)
            t = torch.randint(0, len(alphas), (a.batch,))
            ab = alphas[t][:, None, None, None]
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            loss = torch.nn.functional.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        if step % a.log_every == 0 or step == a.steps - 1:
            log.info("step %5d  loss %.4f  (%.0f s)", step, loss.item(), time.time() - start)
    os.makedirs(a.out, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in ema.items()}
    if a.model == "flux":
        tensors["text_table"], tensors["pooled_table"] = text_table, pooled_table
        info = {"config": CONFIG, "text_tokens": TEXT_TOKENS,
                "data": "sklearn.datasets.load_digits, scaled to [-1, 1], packed 2x2 -> (16, 4)",
                "objective": "rectified flow, v = noise - x0, t logit-normal in (0, 1)", "empty_prompt": 10}
    else:
        info = {"config": DIT_CONFIG, "data": "sklearn.datasets.load_digits, scaled to [-1, 1], (1, 8, 8)",
                "objective": "DDPM epsilon prediction, 1000 timesteps, linear betas 1e-4..0.02",
                "empty_prompt": 10}
    name = f"digits_{a.model}"
    command = "python benchmarks/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    weights, card = os.path.join(a.out, f"{name}.safetensors"), os.path.join(a.out, f"{name}.json")
    # each file atomically (temp file + rename): an interrupted run never leaves a torn file behind
    save_file(tensors, weights + ".tmp",
              metadata={"format": "pt", "trained_steps": str(a.steps), "seed": str(a.seed)})
    os.replace(weights + ".tmp", weights)
    with open(card + ".tmp", "w") as f:
        json.dump({**info, "steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed, "command": command.strip()},
                  f, indent=1)
    os.replace(card + ".tmp", card)
    log.info("wrote %s and %s", os.path.abspath(weights), os.path.basename(card))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
