"""Checkpoint I/O: the streaming reader (``reader``), the atomic sharded writer (``writer``, through
``atomic``), weight identities (``fingerprint``), the safetensors byte layer (``format``), the
pre-merge compatibility check (``compat``), the disk/memory tensor layouts of transformers 5
(``layout``), and where a parent's weights are (``resolve``). See docs/io.md."""

from darwin_hydra.io.compat import IncompatibleParentsError, check_compatible
from darwin_hydra.io.fingerprint import tensor_sha256
from darwin_hydra.io.reader import CheckpointReader, PickleRefusedError
from darwin_hydra.io.resolve import ModelNotFoundError, resolve_model
from darwin_hydra.io.writer import CheckpointWriter

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
