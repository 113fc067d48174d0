"""What every model name means: the models a node serves with their tiers, and the
patterns that map a client's own model names (Claude Code asks for ``claude-...``) to
names the mesh serves.

Both live in one section of ``config.toml``::

    [models]
    serve = ["~/models/Qwen2.5-32B-Instruct-4bit=standard,premium", "default=fast"]
    names = { "claude-*haiku*" = "fast", "claude-*" = "standard" }

``serve`` takes the same ``SPEC[=TIER[,TIER...]]`` as ``--model`` on ``up``, ``install``
and ``worker``: SPEC is a local mlx-lm directory, a name under the models directory, a
cached Hugging Face id, or ``default``; each TIER is another name the model answers to.
``names`` is read in order, first match wins; a pattern uses shell wildcards (``*``,
``?``). A request's model name that no pattern matches is used as it is.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

TIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
"""A tier (or any other name a model answers to): what a request's ``model`` may say."""

DEFAULT_NAMES: dict[str, str] = {"claude-*haiku*": "fast", "claude-*": "standard"}
"""Claude Code's model names out of the box: its small fast model (a haiku) to ``fast``,
its main model to ``standard``, the tiers the default model serves."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model to serve and the tiers it answers to (``SPEC[=TIER[,TIER...]]``)."""

    spec: str
    """``default``, a local mlx-lm directory, a name under the models directory or a
    cached Hugging Face id."""
    tiers: tuple[str, ...] = ()
    explicit: bool = False
    """Whether the user named the tiers (``SPEC=`` with none names none: no tiers)."""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``SPEC`` or ``SPEC=TIER[,TIER...]``; ValueError naming the fix otherwise. The
        split is at the last ``=``, so a directory whose name has one still works when
        the tiers are given."""
        text = text.strip()
        spec, sep, tiers = text.rpartition("=")
        if not sep:
            return cls(text or "default")
        names = tuple(t.strip() for t in tiers.split(",") if t.strip())
        bad = [t for t in names if not TIER.fullmatch(t)]
        if not spec.strip() or bad:
            raise ValueError(f"--model {text!r}: write SPEC=TIER[,TIER...], each tier "
                             "letters, digits and ._:- (for example "
                             "~/models/Qwen2.5-32B-Instruct-4bit=standard,premium)")
        return cls(spec.strip(), names, explicit=True)

    def __str__(self) -> str:
        return f"{self.spec}={','.join(self.tiers)}" if self.explicit else self.spec


def parse_names(text: str) -> dict[str, str]:
    """``PATTERN=NAME;PATTERN=NAME`` (how the environment carries ``names``) as a dict."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(";"))):
        pattern, sep, name = pair.partition("=")
        if not sep or not pattern.strip() or not TIER.fullmatch(name.strip()):
            raise ValueError(f"model name mapping {pair!r}: write PATTERN=NAME, for example "
                             "claude-*=standard")
        out[pattern.strip()] = name.strip()
    return out


def format_names(names: Mapping[str, str]) -> str:
    """The inverse of :func:`parse_names`."""
    return ";".join(f"{pattern}={name}" for pattern, name in names.items())


def resolve_name(name: str, names: Mapping[str, str]) -> str:
    """The mesh name a request's ``model`` stands for: the target of the first pattern
    that matches it (case-sensitive), else the name itself."""
    for pattern, target in names.items():
        if fnmatch.fnmatchcase(name, pattern):
            return target
    return name
