"""Identities of weights: ``tensor_sha256`` (one tensor, what ``checksums.json`` records) and
``fingerprint`` (a whole checkpoint, what a run records of its parents).

``fingerprint`` reads through any reader with ``names``, ``dtype(name)``, ``shape(name)``,
``nbytes(name)``, ``total_bytes`` and ``byte_ranges(name, spans)`` (``CheckpointReader``).
"""

from __future__ import annotations

import hashlib
import torch

from darwin_hydra.io.format import CODES, tensor_bytes

# Models up to this many bytes are hashed in full, larger ones through a strided sample of each tensor.
FINGERPRINT_FULL_BYTES = 64 * 2**20
FINGERPRINT_WINDOW = 4096
FINGERPRINT_WINDOWS = 4
_READ = 16 * 2**20  # full hashes read big tensors piecewise


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes as safetensors stores them (C order, little-endian).

    Dtype and shape are not part of the digest; ``checksums.json`` records one per tensor name.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return hashlib.sha256(tensor_bytes(t.contiguous())).hexdigest()


def sampled_spans(nbytes: int, full: bool) -> list[tuple[int, int]]:
    """(offset, size) of the bytes of an ``nbytes`` tensor that the fingerprint hashes: all of them
    (in reads of at most 16 MiB), or ``FINGERPRINT_WINDOWS`` windows of ``FINGERPRINT_WINDOW`` bytes
    strided evenly, first and last included."""
    n, w, k = nbytes, FINGERPRINT_WINDOW, FINGERPRINT_WINDOWS
    if full or n <= w * k:
        return [(off, min(_READ, n - off)) for off in range(0, n, _READ)]
    return [((n - w) * i // (k - 1), w) for i in range(k)]


def fingerprint(reader, full: bool | None = None) -> str:
    """A stable 16-hex-digit identity of the weights of ``reader`` (not of the file layout).

    sha256 over, for each tensor in sorted name order: its name, dtype, shape, and its bytes —
    all of them when the model is at most 64 MiB (or ``full=True``), else 4 windows of 4 KiB
    strided evenly over the tensor (first and last included; tensors up to 16 KiB whole). So
    resharding or a safetensors/pickle conversion keeps the fingerprint, any change of name,
    shape, dtype or of a small model's values changes it, and so does any change touching the
    sampled bytes of a large model (a fine-tune or merge changes nearly every element); a
    60 GB model costs ~4 small reads per tensor instead of a full read.
    """
    whole = bool(full) if full is not None else reader.total_bytes <= FINGERPRINT_FULL_BYTES
    h = hashlib.sha256(b"darwin-hydra fingerprint v1\n")
    for name in sorted(reader.names):
        dtype = reader.dtype(name)
        h.update(f"{name}\0{CODES.get(dtype, str(dtype))}\0{list(reader.shape(name))}\0".encode())
        for chunk in reader.byte_ranges(name, sampled_spans(reader.nbytes(name), whole)):
            h.update(chunk)
    return h.hexdigest()[:16]
