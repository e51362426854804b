"""The zoo's synthetic skills: small string tasks with one right answer, generated from a seed.

Each skill turns a ``random.Random`` into an item ``(prompt, answer)``; the prompt ends with ``=`` and
the answer is the exact continuation a model must produce. A skill stands in for one of the probe
categories the MRI measures (``category``), so that "where does the mother's MATH live" has a known
answer in the zoo.

Splits: ``dev`` (search fitness), ``test`` (reports), ``probe`` (MRI prompts) are drawn from one stream
per skill with distinct prompts, and training rejects every prompt that appears in any of them, so
scores on dev/test are held out by construction.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

# The probe categories of Darwin V6 (design notes, "Model MRI").
CATEGORIES = ("REASONING", "CODE", "MATH", "KNOWLEDGE", "LANGUAGE")

EVAL_SPLITS = ("dev", "test", "probe")

Item = tuple[str, str]


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: a name (task names use it), the probe category it stands for, a generator."""

    name: str
    category: str
    description: str
    sample: Callable[[random.Random, "SkillParams"], Item]


@dataclass(frozen=True)
class SkillParams:
    """Difficulty knobs shared by the generators (copied from ``ZooConfig``)."""

    add_digits: int = 2
    string_min_len: int = 3
    string_max_len: int = 6
    kv_pairs: int = 4
    # False: only additions whose sum fits in add_digits digits (no carry out of the top digit).
    add_carry_out: bool = True


def _add(rng: random.Random, p: SkillParams) -> Item:
    # Fixed width (zero-padded operands, d+1 answer digits): digit i of each number sits at a fixed
    # offset, which a tiny model needs to learn carries in minutes rather than hours.
    d = p.add_digits
    while True:
        a, b = rng.randrange(10**d), rng.randrange(10**d)
        if p.add_carry_out or a + b < 10**d:
            return f"{a:0{d}d}+{b:0{d}d}=", f"{a + b:0{d + 1}d}"


def _reverse(rng: random.Random, p: SkillParams) -> Item:
    n = rng.randint(p.string_min_len, p.string_max_len)
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return f"rev:{s}=", s[::-1]


def _sort(rng: random.Random, p: SkillParams) -> Item:
    n = rng.randint(p.string_min_len, p.string_max_len)
    s = "".join(rng.choice(string.digits) for _ in range(n))
    return f"sort:{s}=", "".join(sorted(s))


def _kv(rng: random.Random, p: SkillParams) -> Item:
    keys = rng.sample(string.ascii_lowercase, p.kv_pairs)
    values = [f"{rng.randrange(100):02d}" for _ in keys]
    query = rng.randrange(p.kv_pairs)
    pairs = " ".join(k + v for k, v in zip(keys, values))
    return f"kv:{pairs}?{keys[query]}=", values[query]


# The zoo's "world knowledge": a fixed secret substitution of the alphabet, the same in every zoo. A
# model can only know it from training; items are new strings, so test items are still held out.
_CIPHER = dict(zip(string.ascii_lowercase, random.Random(20240613).sample(string.ascii_lowercase, 26)))


def _cipher(rng: random.Random, p: SkillParams) -> Item:
    n = rng.randint(p.string_min_len, p.string_max_len)
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return f"map:{s}=", "".join(_CIPHER[c] for c in s)


def _copy(rng: random.Random, p: SkillParams) -> Item:
    n = rng.randint(p.string_min_len, p.string_max_len)
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return f"copy:{s}=", s


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "MATH", "fixed-width addition: '47+89=' -> '136', '07+02=' -> '009'", _add),
        Skill("rev", "LANGUAGE", "string reversal: 'rev:abcd=' -> 'dcba'", _reverse),
        Skill("sort", "CODE", "sort the digits: 'sort:5281=' -> '1258'", _sort),
        Skill("map", "KNOWLEDGE", "recall a fixed secret letter substitution: 'map:abc=' -> 'cuf'", _cipher),
        Skill("kv", "KNOWLEDGE", "key-value recall from context: 'kv:a37 f71?f=' -> '71'", _kv),
        Skill("copy", "LANGUAGE", "copy a string: 'copy:abcd=' -> 'abcd'", _copy),
    )
}

# Every character a prompt or answer can contain; the tokenizer's vocabulary is built from it.
ALPHABET = string.digits + string.ascii_lowercase + "+=:? "


def get_skill(name: str) -> Skill:
    """The skill called ``name``; a clear error lists the known ones."""
    try:
        return SKILLS[name]
    except KeyError:
        raise ValueError(f"unknown zoo skill {name!r}; known skills: {sorted(SKILLS)}") from None


def stream_seed(seed: int, *parts: str) -> int:
    # A seed per (skill, purpose) that does not depend on Python's hash randomisation.
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def eval_splits(
    skill: str, params: SkillParams, sizes: dict[str, int], seed: int
) -> dict[str, list[Item]]:
    """Disjoint evaluation splits of ``skill``: ``{split: [(prompt, answer), ...]}``.

    Items are drawn in the order of ``sizes`` from one seeded stream; a prompt already taken by an
    earlier split (or earlier in the same split) is skipped, so no prompt appears twice.
    """
    gen = get_skill(skill)
    rng = random.Random(stream_seed(seed, "eval", skill))
    seen: set[str] = set()
    out: dict[str, list[Item]] = {}
    for split, n in sizes.items():
        items: list[Item] = []
        tries = 0
        while len(items) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(
                    f"skill {skill!r}: cannot draw {n} distinct items for split {split!r}; "
                    "make the skill harder (longer strings, more digits) or ask for fewer items"
                )
            prompt, answer = gen.sample(rng, params)
            if prompt in seen:
                continue
            seen.add(prompt)
            items.append((prompt, answer))
        out[split] = items
    return out


class TrainStream:
    """An endless, seeded stream of training items for a mixture of skills, never yielding a held-out prompt.

    ``mixture`` maps skill name -> weight; each item picks its skill by weight, then draws an item of it.
    """

    def __init__(
        self, mixture: dict[str, float], params: SkillParams, held_out: set[str], seed: int, purpose: str
    ) -> None:
        if not mixture or any(w < 0 for w in mixture.values()) or sum(mixture.values()) <= 0:
            raise ValueError(f"training mixture {mixture!r} must give a positive weight to at least one skill")
        self.names = list(mixture)
        self.weights = [float(mixture[n]) for n in self.names]
        self.skills = [get_skill(n) for n in self.names]
        self.params = params
        self.held_out = held_out
        self.rng = random.Random(stream_seed(seed, "train", purpose))

    def batch(self, size: int) -> list[Item]:
        items: list[Item] = []
        while len(items) < size:
            skill = self.rng.choices(self.skills, weights=self.weights)[0]
            prompt, answer = skill.sample(self.rng, self.params)
            if prompt not in self.held_out:
                items.append((prompt, answer))
        return items
