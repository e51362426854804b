"""The choices of the run's options (``config.py``'s schema types them with these Enums, so a value
outside one is refused when the config is composed)."""

from enum import StrEnum


class RouterSource(StrEnum):
    """Where an MoE block's router comes from: a parent whole, or the ratio map (``merge``)."""

    father = "father"
    mother = "mother"
    merge = "merge"


class Proxy(StrEnum):
    """Phase 1's cheap fitness: the KL to each probe set's teacher parent (docs/search.md)."""

    teacher_kl = "teacher_kl"


class ProxyTeacher(StrEnum):
    """Who teaches each probe set: the MRI's assignment, or the parent with the lower NLL."""

    mri = "mri"
    nll = "nll"


class ChildCandidate(StrEnum):
    """What the child may be, chosen on the dev split after the search: its best genome, the MRI's own
    child, the best uniform ratio."""

    genome = "genome"
    mri = "mri"
    uniform = "uniform"


class OutsideDecoder(StrEnum):
    """Where the child takes the tensors outside the text decoder (vision/audio towers, projectors,
    MTP heads): whole from a parent, or merged by the same recipe as the rest."""

    father = "father"
    mother = "mother"
    merge = "merge"


class LoggerMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"
