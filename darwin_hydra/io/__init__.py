"""Checkpoint I/O: streaming reader and atomic sharded writer (``checkpoint``), the pre-merge
compatibility check (``compat``), the disk/memory tensor layouts of transformers 5 (``layout``),
and where a parent's weights are (``resolve``). See docs/io.md."""

from darwin_hydra.io.checkpoint import (
    CheckpointReader,
    CheckpointWriter,
    IncompatibleParentsError,
    PickleRefusedError,
    check_compatible,
    tensor_sha256,
)
from darwin_hydra.io.resolve import ModelNotFoundError, resolve_model

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "IncompatibleParentsError",
    "ModelNotFoundError",
    "PickleRefusedError",
    "check_compatible",
    "resolve_model",
    "tensor_sha256",
]
