"""Files besides the weights that make a checkpoint directory usable (config, tokenizer, chat
template, processor configs, the code an ``auto_map`` names): the child gets them from its father."""

from __future__ import annotations

import json
from pathlib import Path

# Files besides the weights that make a checkpoint directory usable: copied from the source parent
# into the child (fnmatch patterns, matched against names in the top level of the directory).
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)

def remote_code_files(model_dir: Path) -> set[str]:
    """The Python modules a checkpoint's ``auto_map`` points at (``configuration_x.XConfig`` ->
    ``configuration_x.py``, in config.json and tokenizer_config.json), which a child must carry so
    that its config keeps loading with ``trust_remote_code``. Entries naming code in another repo
    (``other/repo--module.Class``) need no file. A module the map names and the directory lacks is an
    error naming it: a child whose config points at missing code would not load."""
    names: set[str] = set()
    for cfg_name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / cfg_name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
        except (json.JSONDecodeError, AttributeError):
            continue
        refs = []
        for v in auto_map.values():
            refs += v if isinstance(v, list) else [v]
        for ref in refs:
            if not isinstance(ref, str) or "--" in ref or "." not in ref:
                continue
            names.add(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    missing = sorted(n for n in names if not (Path(model_dir) / n).is_file())
    if missing:
        raise FileNotFoundError(
            f"{model_dir}: its auto_map names code the directory lacks: {missing}; the child's config would point "
            "at code that is not there (copy those files next to config.json, or remove auto_map)"
        )
    return names


def support_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` (top level, sorted by name) that a child copies from it: those
    matching ``SUPPORT_FILES`` and the code its ``auto_map`` names (``remote_code_files``)."""
    import fnmatch

    code = remote_code_files(model_dir)
    return [
        p for p in sorted(Path(model_dir).iterdir())
        if p.is_file() and (p.name in code or any(fnmatch.fnmatch(p.name, pat) for pat in SUPPORT_FILES))
    ]
