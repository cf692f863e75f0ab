"""Input validation shared by the measurement functions.

Every public function of decomp validates what it is given and raises a ``ValueError`` or
``TypeError`` that names the offending argument, instead of letting a ``nan`` or an opaque
torch trace surface later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


def check_params(params: object, name: str = "params") -> Params:
    """Check that ``params`` is a non-empty ``dict[str, Tensor]`` of floating tensors."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict[str, Tensor], got {type(params).__name__}")
    if len(params) == 0:
        raise ValueError(f"{name} is empty")
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {type(key).__name__} ({key!r})")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating-point tensor, got {value.dtype}")
    return dict(params)


def check_like(v: object, params: Params, name: str = "v") -> Params:
    """Check that ``v`` has exactly the keys, shapes and dtypes of ``params``."""
    if not isinstance(v, Mapping):
        raise TypeError(f"{name} must be a dict[str, Tensor] like params, got {type(v).__name__}")
    missing = [k for k in params if k not in v]
    extra = [k for k in v if k not in params]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"{name} keys do not match params: {'; '.join(parts)}")
    out = {}
    for key, ref in params.items():
        value = v[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(value.shape)}, params has {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            raise TypeError(f"{name}[{key!r}] has dtype {value.dtype}, params has {ref.dtype}")
        out[key] = value
    return out


def check_number(
    x: object, name: str, *, nonnegative: bool = False, positive: bool = False
) -> float:
    """Check that ``x`` is a finite real number (optionally >= 0 or > 0) and return it."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if nonnegative and x < 0:
        raise ValueError(f"{name} must be non-negative, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be positive, got {x}")
    return x


def check_finite(t: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` if ``t`` holds a NaN or an infinity."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {n_inf} infinite values")
    return t


def check_same_shape(**tensors: Tensor) -> torch.Size:
    """Check that all named tensors have one shape; return it."""
    shape = None
    first = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(
                f"shape mismatch: {name} has shape {tuple(t.shape)}, {first} has {tuple(shape)}"
            )
    assert shape is not None
    return shape


def check_mask(mask: Tensor, name: str = "mask") -> Tensor:
    """Check a 0/1 (or bool) mask and return it as a bool tensor of the same shape."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1 (or be a bool tensor)")
    return mask.bool()


def scalar_function(f: Callable[[Params], Tensor], name: str) -> Callable[[Params], Tensor]:
    """Wrap ``f`` so that a non-scalar return value raises a ``ValueError`` naming ``name``."""
    if not callable(f):
        raise TypeError(f"{name} must be callable, got {type(f).__name__}")

    def wrapped(params: Params) -> Tensor:
        out = f(params)
        if not isinstance(out, Tensor):
            raise TypeError(f"{name} must return a Tensor, got {type(out).__name__}")
        if out.numel() != 1:
            raise ValueError(f"{name} must return a scalar, got a tensor of shape {tuple(out.shape)}")
        return out.reshape(())

    return wrapped
