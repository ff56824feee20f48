"""Profiling: calibrate on prompts and measure, per cache point and step, how redundant a denoiser's features are.

Like quantization calibration (annotate → observe → calibrate), but the statistics are temporal: how much each
cache point changes from step to step, how well each predictor forecasts it, and how much approximating it at a
step changes the final sample. Above ``trace`` and ``passes``: it drives them and the user's loop. The result, a
:class:`Profile`, is what plans are built from.
"""

from fxcache.profiling.driver import check_loop_arguments, profile, run_profile
from fxcache.profiling.metrics import BASIC_METRICS
from fxcache.profiling.result import Profile

__all__ = ["BASIC_METRICS", "Profile", "check_loop_arguments", "profile", "run_profile"]
