"""Floating dtypes a user may name in config (``parents.dtype``, ``mri.dtype``, ``merge.dtype``), and
the one place their names become torch dtypes."""

from __future__ import annotations

from enum import StrEnum


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def torch_dtype(name: "str | Dtype"):
    """``torch.float32`` for ``"float32"`` etc.; a name outside ``Dtype`` is an error naming the choices."""
    import torch

    try:
        return getattr(torch, Dtype(str(name)).value)
    except ValueError:
        raise ValueError(f"dtype {name!r} is not one of {[d.value for d in Dtype]}") from None
