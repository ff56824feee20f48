"""Coverage of diffusers' denoisers: every ``ModelMixin`` subclass of ``diffusers.models.transformers`` and
``diffusers.models.unets`` (discovered by walking the two subpackages, not from a list), built from a tiny config,
given example inputs, then traced and checked the way a new user would use fxcache on it.

* **tiny config** — the class's ``__init__`` defaults, shrunk by parameter *name* (layer counts, heads, widths,
  sample sizes; :func:`tiny_config`), then a class's entry in :data:`fxcache.testing.coverage_specs.SPECS` where
  the defaults are huge or inconsistent (the only class-specific code, and only for building test models);
* **example inputs** — from ``forward``'s signature: each required argument (and the usual optional ones) made
  by name from the config (:func:`example_inputs`), the sample's layout probed (image, video, tokens) until the
  eager model runs;
* **checks** (:func:`check`) — capture and its strategy, parity with eager (fp32, 1e-5), blocks found vs the
  model's own block lists, step input found, ``Full()`` reproducing the eager sampling run exactly, and stack reuse
  (``Scheduled(full=2, action="reuse")``) running at the computed fraction its schedule implies; the first failure
  is recorded with its reason.

``python benchmarks/coverage.py`` runs it over every class and writes the table; ``tests/test_coverage.py`` keeps
the number from regressing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import pkgutil
import re
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "ROOTS",
    "Spec",
    "check",
    "check_within",
    "denoiser_classes",
    "example_inputs",
    "expected_blocks",
    "summary",
    "tiny_config",
    "worker_init",
]

#: the subpackages whose ModelMixin subclasses are diffusers' denoisers
ROOTS = ("diffusers.models.transformers", "diffusers.models.unets")
BATCH = 1
STEPS = 4


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build one class's tiny test model where the generic rules do not suffice."""

    #: overrides of the generic tiny config
    config: dict = dataclasses.field(default_factory=dict)
    #: ``(model, generator) -> dict``: the example inputs, replacing the generic ones
    inputs: Callable | None = None
    #: inputs added to (or replacing) the generic ones: name -> value or ``(model, generator) -> value``
    extra: dict = dataclasses.field(default_factory=dict)
    #: why the class cannot be checked from a tiny config (needs pretrained parts...): listed, never a pass
    needs: str | None = None
    #: why the class is not a denoiser (an adapter, a decoder): listed, outside the count
    not_a_denoiser: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# discovery


def denoiser_classes() -> dict[str, type]:
    """``{class name: class}`` of every ModelMixin subclass defined in :data:`ROOTS`' modules (a module that
    fails to import is logged and skipped)."""
    from diffusers.models.modeling_utils import ModelMixin

    found: dict[str, type] = {}
    for root in ROOTS:
        package = importlib.import_module(root)
        for info in pkgutil.iter_modules(package.__path__):
            name = f"{root}.{info.name}"
            try:
                module = importlib.import_module(name)
            except Exception as e:  # an optional dependency missing: the class is reported as not importable
                log.warning("cannot import %s: %s", name, e)
                continue
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, ModelMixin) and obj.__module__ == name:
                    found[obj.__name__] = obj
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------------------------
# tiny configs

_LAYERS = re.compile(r"^(num_)?(.*_)?(layers|blocks|depth|single_layers|refiner_layers)$|^depth$")
_HEADS = re.compile(r"^(num_)?(attention_)?heads?$|^num_(.*_)?heads$|^n_heads$")
_HEAD_DIM = re.compile(r"^(attention_)?head_dim$|^attention_head_dim$|^dim_head$")
_WIDTH = re.compile(
    r"^(joint_attention_dim|cross_attention_dim|caption_channels|text_embed_dim|text_dim|"
    r"encoder_hid_dim|pooled_projection_dim|context_dim|cap_feat_dim|text_hidden_dim|"
    r"time_embed_dim|inner_dim|hidden_size|hidden_dim|ffn_dim|mlp_dim|freq_dim|"
    r"text_embed_dim|projection_dim|image_embed_dim|clip_embed_dim)$"
)
_SIZE = re.compile(r"^(sample_size|sample_height|sample_width|height|width|input_size|max_size)$")


def tiny_config(cls: type, spec: Spec | None = None) -> dict:
    """The class's ``__init__`` defaults shrunk by name (see the module docstring), then ``spec.config``."""
    params = inspect.signature(cls.__init__).parameters
    config: dict[str, Any] = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        value = p.default
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            if _LAYERS.match(name) and value > 2:
                config[name] = 2
            elif _HEADS.match(name) and value > 2:
                config[name] = 2
            elif _HEAD_DIM.match(name) and value > 16:
                config[name] = 16
            elif _WIDTH.match(name) and value > 32:
                config[name] = 32
            elif _SIZE.match(name) and value > 16:
                config[name] = 16
        elif isinstance(value, (tuple, list)) and name == "block_out_channels" and len(value) > 2:
            config[name] = (32, 64)
    if "block_out_channels" in config:  # a 2-level UNet: the per-level tuples cut to match
        levels = len(params["block_out_channels"].default)
        for name, p in params.items():
            value = p.default
            if name != "block_out_channels" and isinstance(value, (tuple, list)) and len(value) == levels:
                config[name] = tuple(value[-2:]) if name.startswith("up_") else tuple(value[:2])
        if "norm_num_groups" in params:
            config["norm_num_groups"] = 8
        for name in ("attention_head_dim", "num_attention_heads"):
            if name in params and isinstance(params[name].default, (tuple, list)):
                config[name] = tuple(params[name].default[:2])
            elif name in params and isinstance(params[name].default, int) and params[name].default > 8:
                config[name] = 8
    config.update((spec or Spec()).config)
    return config


def build(cls: type, spec: Spec | None = None, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``cls`` (seeded weights, fp32, eval mode)."""
    torch.manual_seed(seed)
    with torch.device("cpu"):  # test models and their inputs live on the CPU, whatever the default device
        model = cls(**tiny_config(cls, spec)).eval()
    with torch.no_grad():  # parameters left uninitialised (torch.empty, filled from a checkpoint in real use)
        for p in model.parameters():
            if p.numel() and (not torch.isfinite(p).all() or p.abs().max() > 1e6):
                p.normal_(0.0, 0.02)
    return model


# ---------------------------------------------------------------------------------------------------------------
# example inputs

_SAMPLE = ("hidden_states", "sample", "x", "latents", "hidden_state", "latent", "noisy_latents", "img", "z")
_STEP = ("timestep", "timesteps", "t", "sigma", "sigmas", "noise_level", "time", "timestep_cond_index")
_TEXT = (
    "encoder_hidden_states",
    "context",
    "encoder_hidden_states_t5",
    "prompt_embeds",
    "text_embeds",
    "cap_feats",
    "y",
    "txt",
    "text_states",
    "caption",
)
_TEXT_DIMS = (
    "joint_attention_dim",
    "cross_attention_dim",
    "caption_channels",
    "text_embed_dim",
    "text_dim",
    "encoder_hid_dim",
    "context_dim",
    "cap_feat_dim",
    "text_hidden_dim",
    "text_states_dim",
    "caption_projection_dim",
    "encoder_hidden_size",
    "txt_in_features",
    "context_in_dim",
)
_CHANNELS = ("in_channels", "in_dim", "num_channels", "latent_channels", "input_dim", "in_features", "in_chans")


def _cfg(model: torch.nn.Module, *names: str, default=None):
    config = getattr(model, "config", {})
    for name in names:
        value = config.get(name) if hasattr(config, "get") else None
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], int):
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _layouts(model: torch.nn.Module, gen: torch.Generator) -> list[torch.Tensor]:
    """Candidate samples: image [B, C, H, W], video [B, C, F, H, W] (and [B, F, C, H, W]), tokens [B, N, C]."""
    c = _cfg(model, *_CHANNELS, default=4)
    p = _cfg(model, "patch_size", default=2)
    side = max(2 * p, 4 * p if p <= 2 else 2 * p)
    size = _cfg(model, "sample_size", default=side)
    side = size if size and size <= 32 else side
    return [
        torch.randn(BATCH, c, side, side, generator=gen, device="cpu"),
        torch.randn(BATCH, c, 2, side, side, generator=gen, device="cpu"),
        torch.randn(BATCH, 2, c, side, side, generator=gen, device="cpu"),
        torch.randn(BATCH, 16, c, generator=gen, device="cpu"),
        torch.randn(BATCH, c, 16, generator=gen, device="cpu"),
    ]


def _value_for(name: str, p: inspect.Parameter, model: torch.nn.Module, gen: torch.Generator, sample) -> Any:
    """The generic example value of forward argument ``name`` (None: leave it to its default)."""
    text_len = 8
    if name in _STEP:
        return torch.full((BATCH,), 500.0, device="cpu")
    if name in _TEXT:
        return torch.randn(BATCH, text_len, _cfg(model, *_TEXT_DIMS, default=32), generator=gen, device="cpu")
    if name in ("pooled_projections", "pooled_prompt_embeds", "pooled_text_emb", "vec"):
        return torch.randn(
            BATCH, _cfg(model, "pooled_projection_dim", "vec_in_dim", default=32), generator=gen, device="cpu"
        )
    if name == "img_ids":
        n = sample.shape[1] if sample.dim() == 3 else 16
        return torch.zeros(n, 3, device="cpu")
    if name == "txt_ids":
        return torch.zeros(text_len, 3, device="cpu")
    if name == "guidance":
        return torch.full((BATCH,), 3.5, device="cpu")
    if name in ("class_labels", "labels"):
        return torch.zeros(BATCH, dtype=torch.long, device="cpu")
    if name in (
        "encoder_attention_mask",
        "attention_mask",
        "text_mask",
        "prompt_attention_mask",
        "encoder_hidden_states_mask",
    ):
        return torch.ones(BATCH, text_len, dtype=torch.bool, device="cpu") if p.default is p.empty else None
    return None


def example_inputs(model: torch.nn.Module, spec: Spec | None = None, seed: int = 0) -> dict:
    """Example keyword inputs of ``model.forward`` (see the module docstring): the first generic candidate the
    eager model runs on, or ``spec.inputs``; raises the last eager error when none runs."""
    spec = spec or Spec()
    gen = torch.Generator().manual_seed(seed)
    if spec.inputs is not None:
        return spec.inputs(model, gen)
    params = {
        n: p
        for n, p in inspect.signature(model.forward).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    errors: list[str] = []
    for sample in _layouts(model, gen):
        inputs: dict[str, Any] = {}
        for name, p in params.items():
            if name in _SAMPLE and name not in inputs and not any(k in inputs for k in _SAMPLE):
                inputs[name] = sample
                continue
            value = _value_for(name, p, model, gen, sample)
            if value is not None:
                inputs[name] = value
            elif p.default is p.empty and name not in spec.extra:
                inputs[name] = None  # required but unknown: let the model say what it is
        for name, value in spec.extra.items():
            inputs[name] = value(model, gen) if callable(value) else value
        if "return_dict" in params:
            inputs["return_dict"] = False
        try:
            with torch.no_grad():
                out = model(**inputs)
            if _first_tensor(out) is None:
                raise ValueError("the forward returned no tensor")
            return inputs
        except Exception as e:  # the next layout may fit
            errors.append(f"sample {list(sample.shape)}: {_reason(e, 120)}")
    raise ValueError("no generic example inputs run the model — " + "; ".join(errors))


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in (_first_tensor(o) for o in out) if t is not None), None)
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    if isinstance(out, dict):
        return _first_tensor(list(out.values()))
    return None


def expected_blocks(model: torch.nn.Module) -> list[str]:
    """The model's own block lists: the children of every ``ModuleList`` whose elements have parameters and share
    one class (a stack of repeated blocks), outermost lists only."""
    found: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(f + ".") for f in found):
            continue
        kinds = {type(m) for m in module}
        if len(kinds) == 1 and all(any(True for _ in m.parameters()) for m in module):
            found.extend(f"{path}.{i}" for i in range(len(module)))
    return found


# ---------------------------------------------------------------------------------------------------------------
# the checks


def make_sampler(template: dict, sample_key: str, step_key: str, steps: int = STEPS):
    """A ``steps``-step Euler-like loop over ``template`` (the example call): the prompt seeds the initial
    sample; the step input decreases from its example value; each step moves the sample by the model's output
    (its first channels when it predicts more, e.g. a learned variance)."""
    t0, x0 = _get(template, step_key), _get(template, sample_key)

    def sampler(denoiser, prompt):
        gen = torch.Generator().manual_seed(int(prompt))
        x = x0 + 0.5 * torch.randn(x0.shape, generator=gen, device="cpu")
        for i in range(steps):
            frac = 1.0 - i / steps
            t = (t0 * frac) if t0.is_floating_point() else (t0.float() * frac).round().to(t0.dtype)
            out = _first_tensor(denoiser(**_set(_set(template, sample_key, x), step_key, t)))
            if out.shape == x.shape:
                x = x - out / steps
            elif (
                out.dim() == x.dim()
                and out.shape[0] == x.shape[0]
                and out.shape[2:] == x.shape[2:]
                and out.shape[1] >= x.shape[1]
            ):
                x = x - out[:, : x.shape[1]] / steps
            elif out.numel() == x.numel():
                x = x - out.reshape(x.shape) / steps
            else:
                x = x - out.mean() / steps
        return x

    return sampler


_PATH = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]")


def _path(name: str) -> list:
    """An input name as fxcache writes it (``vision_tokens[0]``, ``added_cond_kwargs.text_embeds``) as keys."""
    return [k if k else int(i) for k, i in _PATH.findall(name)]


def _get(inputs: dict, name: str):
    value = inputs
    for key in _path(name):
        value = value[key]
    return value


def _set(inputs, name: str, new):
    """A copy of ``inputs`` with the leaf at ``name`` replaced (containers along the path copied)."""
    keys = _path(name)

    def put(container, i):
        if i == len(keys):
            return new
        if isinstance(container, dict):
            return {**container, keys[i]: put(container[keys[i]], i + 1)}
        items = list(container)
        items[keys[i]] = put(items[keys[i]], i + 1)
        return type(container)(items) if isinstance(container, tuple) else items

    return put(inputs, 0)


def check(name: str, cls: type | None = None, spec: Spec | None = None) -> dict:
    """The coverage record of class ``name`` (see the module docstring): ``status`` is ``"pass"``, ``"fail"``
    (``stage`` and ``reason`` say where and why), ``"needs"`` (what a tiny config cannot give) or ``"not a
    denoiser"``."""
    import fxcache
    from fxcache import methods as M
    from fxcache.testing.coverage_specs import SPECS

    cls = cls or denoiser_classes()[name]
    spec = spec or SPECS.get(name, Spec())
    record: dict[str, Any] = {"class": name, "module": cls.__module__.split(".")[-1], "status": "fail"}
    start = time.perf_counter()
    if spec.not_a_denoiser:
        record.update(status="not a denoiser", reason=spec.not_a_denoiser)
        return record
    if spec.needs:
        record.update(status="needs", reason=spec.needs)
        return record
    stage = "build"
    try:
        model = build(cls, spec)
        stage = "inputs"
        inputs = example_inputs(model, spec)
        stage = "trace"
        traced = fxcache.trace(model, inputs)
        record["strategy"] = traced.capture_strategy
        stage = "parity"
        with torch.no_grad():
            want, got = _first_tensor(model(**inputs)), _first_tensor(traced(**inputs))
        if not torch.isfinite(want).all():
            stage = "inputs"
            raise ValueError("the eager model's output has non-finite values on these inputs")
        scale = want.abs().max().item() or 1.0
        record["parity_max_abs"] = (got - want).abs().max().item()
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * scale):
            raise AssertionError(
                f"traced output differs from eager by {record['parity_max_abs']:.3g} (output scale {scale:.3g})"
            )
        stage = "blocks"
        found, own = list(traced.blocks), expected_blocks(model)
        record.update(
            blocks_found=len(found), blocks_expected=len(own), blocks_missing=[b for b in own if b not in found][:5]
        )
        if not found:
            raise AssertionError("no blocks found")
        stage = "step input"
        call = traced.region or traced  # a region capture's graph inputs are the region's; the call's are the model's
        record["step_input"], record["sample_input"] = call.step_input, call.sample_input
        if call.step_input is None or call.sample_input is None:
            raise AssertionError(f"step input {call.step_input!r}, sample input {call.sample_input!r}")
        sampler = make_sampler(inputs, call.sample_input, call.step_input)
        stage = "Full() exact"
        with torch.no_grad():
            eager = sampler(model, 1)
        opt = fxcache.optimize(model, [0], sampler=sampler, method=M.Full(), progress=False)
        with torch.no_grad():
            full = sampler(opt, 1)
        if not torch.equal(full, eager):
            raise AssertionError(f"Full() differs from eager by {(full - eager).abs().max().item():.3g}")
        stage = "stack reuse"
        try:
            opt = fxcache.optimize(
                model, [0], sampler=sampler, method=M.Scheduled(full=2, action="reuse"), progress=False
            )
            record["granularity"] = "stack"
        except fxcache.InputError as e:  # a U-Net: no stack of repeated blocks, its blocks are the points
            if "no stack cache points" not in str(e):
                raise
            stage = "block reuse"
            opt = fxcache.optimize(
                model,
                [0],
                sampler=sampler,
                progress=False,
                method=M.Scheduled(full=2, action="reuse", granularity="block"),
            )
            record["granularity"] = "block"
        with torch.no_grad():
            cached = sampler(opt, 1)
        stats = opt.stats()
        record["computed_fraction"] = stats["computed_fraction"]
        record["full_steps"] = stats["full_steps"]
        if not torch.isfinite(cached).all():
            raise AssertionError("stack reuse gave non-finite values")
        if stats["full_steps"] != 2 or not stats["computed_fraction"] < 1.0 - 1e-6:
            raise AssertionError(
                f"stack reuse computed {stats['full_steps']} full steps of {STEPS}, fraction "
                f"{stats['computed_fraction']:.3f}"
            )
        if not 2 / STEPS - 1e-6 <= stats["computed_fraction"] <= 1.0:
            raise AssertionError(
                f"computed fraction {stats['computed_fraction']:.3f} below its schedule's {2 / STEPS:.2f}"
            )
        record["status"] = "pass"
    except Exception as e:  # every failure is a row of the table, with its reason
        record["stage"] = stage
        record["reason"] = _reason(e)
        log.debug("%s failed at %s:\n%s", name, stage, traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def worker_init(verbose: bool = False) -> None:
    """Set up a worker process of ``benchmarks/coverage.py``: quiet logs (debug ones with ``verbose``), one thread."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        logging.getLogger("fxcache").setLevel(logging.ERROR)
    torch.set_num_threads(1)


def check_within(name: str, timeout: int) -> dict:
    """:func:`check` of ``name``, failing with a timeout reason after ``timeout`` seconds (an alarm: call it in a
    process's main thread, e.g. a worker process)."""

    def alarm(*_):
        raise TimeoutError(f"took more than {timeout} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        return check(name)
    except TimeoutError as e:
        return {"class": name, "status": "fail", "stage": "timeout", "reason": str(e)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_SITE = re.compile(r"[^\s(]*/(site|dist)-packages/")


def _reason(e: BaseException, limit: int = 240) -> str:
    text = _SITE.sub("", " ".join(str(e).split()))  # diffusers/models/... rather than this machine's path
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary(records: list[dict]) -> dict:
    """Counts: classes, denoisers (outside the count: not a denoiser), passes, fails, needs; the pass rate over
    the denoisers."""
    denoisers = [r for r in records if r["status"] != "not a denoiser"]
    passed = sum(r["status"] == "pass" for r in denoisers)
    return {
        "classes": len(records),
        "denoisers": len(denoisers),
        "pass": passed,
        "fail": sum(r["status"] == "fail" for r in denoisers),
        "needs": sum(r["status"] == "needs" for r in denoisers),
        "pass_rate": passed / len(denoisers) if denoisers else math.nan,
    }
