"""Input checks shared by the `radon` operators: clear `ValueError`s before any work is done.

Shape and rank checks are static and always run. Value checks (finite, non-negative) need concrete
arrays, so they run on concrete inputs and are skipped for tracers inside `jit`/`grad`.
"""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_array(x, trailing_shape: tuple[int, ...], name: str, layout: str) -> None:
    """Rank and trailing shape of `x` must match `trailing_shape`; values must be finite."""
    shape = np.shape(x)
    if len(shape) < len(trailing_shape):
        raise ValueError(
            f"{name} must have rank >= {len(trailing_shape)} with layout {layout} ending in {trailing_shape}; "
            f"got rank {len(shape)} with shape {shape}"
        )
    if tuple(shape[len(shape) - len(trailing_shape):]) != tuple(trailing_shape):
        raise ValueError(
            f"{name} must end in {tuple(trailing_shape)} ({layout}) to match the geometry; got shape {shape}"
        )
    check_finite(x, name)


def check_finite(x, name: str) -> None:
    if is_concrete(x) and np.size(x) and not np.all(np.isfinite(np.asarray(x, dtype=np.float32))):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x, dtype=np.float32))))
        raise ValueError(f"{name} must be finite; got {bad} NaN or inf value(s)")


def check_nonnegative(x, name: str) -> None:
    """For counts and activities: every value must be >= 0 (and finite)."""
    check_finite(x, name)
    if is_concrete(x) and np.size(x):
        arr = np.asarray(x, dtype=np.float32)
        if np.any(arr < 0):
            raise ValueError(
                f"{name} must be non-negative (counts or activity); got {int(np.sum(arr < 0))} negative value(s), "
                f"minimum {float(arr.min()):.4g}"
            )
