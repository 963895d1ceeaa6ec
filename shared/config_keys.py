"""Config keys declared once: each key is a dataclass field that says how it is read.

A section of the config file is a frozen dataclass whose keys are fields made with
``setting(kind, default, help)``: ``kind`` turns the YAML value into the field's value or
raises ``Invalid`` saying what was expected, ``default`` is the value as one would write it
in YAML (it goes through ``kind`` like a given value, and ``kind(default)`` is the field's
own default), ``help`` is README's text. ``read(cls, section)`` reads every such field;
``rows(prefix, cls)`` gives README's table rows. Any module (a backend too) can declare a
section this way, and ``joined`` makes one section of keys that several modules declare
(each scheduler adds its own keys to ``hpc``).

Reading never stops at a mistake: a ``Section`` records each problem, named by its key, in
the ``Problems`` of the whole file and gives ``BAD`` for that key; the loader raises one
``ConfigError`` with every problem, one per line, once everything has been read. Checks
across keys skip values that are ``BAD`` (the key's own problem says enough).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from shared.errors import ConfigError

SETTING = "setting"  # the key of a field's metadata that holds its Setting


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # a key with no default: missing is a problem
BAD = _Marker("BAD")            # the value of a key whose problem was recorded
_UNSET = _Marker("UNSET")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")  # a host's or a slot's name


class Invalid(Exception):
    """A value a kind refuses; the text is what follows ``key: `` in the message."""


def bad(value: Any, expected: str) -> Invalid:
    """The usual refusal: ``got <value>, expected <expected>``."""
    return Invalid(f"got {value!r}, expected {expected}")


def known(*values: Any) -> bool:
    """True when none of ``values`` is BAD: a check across keys may look at them."""
    return not any(value is BAD for value in values)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config key: how its value is read, its default (as written in YAML) and its help."""
    kind: Callable[[Any], Any]
    default: Any = REQUIRED
    help: str = ""
    shown: str | None = None  # README's default column, when the default's own text would not do

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        return _shown(self.default)


def _shown(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{yaml.safe_dump(value, default_flow_style=True, width=1000).strip()}`"


def setting(kind: Callable[[Any], Any], default: Any = REQUIRED, help: str = "", *, shown: str | None = None) -> Any:
    """A dataclass field that is a config key (see the module's docstring).

    The field's own default is ``kind(default)``; a required key, or one whose kind reads
    named entries, has none (the loader always gives it).
    """
    meta = {SETTING: Setting(kind, default, help, shown)}
    if default is REQUIRED or isinstance(kind, Entries):
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=kind(default), metadata=meta)


def settings(cls: type) -> dict[str, Setting]:
    """The declared keys of a section's dataclass, in declaration order."""
    return {f.name: f.metadata[SETTING] for f in dataclasses.fields(cls) if SETTING in f.metadata}


class Problems:
    """Every problem of one config file, in the order found."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, text: str) -> Any:
        """Record ``key: text``; return BAD, the value of a key with a problem."""
        self.lines.append(f"{key}: {text}")
        return BAD

    def raise_if_any(self) -> None:
        """Raise one ConfigError holding every problem, one per line."""
        if self.lines:
            raise ConfigError("\n".join(self.lines))


class Section:
    """One mapping of the YAML file: reads declared keys from it and remembers which it read.

    ``root`` is the folder relative paths are resolved against: every ``Path`` a kind
    returns that is not absolute is taken as relative to it.
    """

    def __init__(self, name: str, data: Any, problems: Problems, root: Path = Path(".")):
        self.name, self.problems, self.root, self.used = name, problems, root, set()
        self.broken = data is not None and not isinstance(data, dict)
        if self.broken:
            problems.add(name, f"got {data!r}, expected a mapping of keys")
        self.data: dict = data if isinstance(data, dict) else {}

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def problem(self, key: str, text: str) -> Any:
        """Record a problem of ``key`` of this section; return BAD."""
        return self.problems.add(self.key(key), text)

    def get(self, key: str, declared: Setting, default: Any = _UNSET) -> Any:
        """The value of ``key`` read as ``declared`` says (``default`` overrides its default), or BAD."""
        self.used.add(key)
        if self.broken:
            return BAD
        raw = self.data.get(key, declared.default if default is _UNSET else default)
        if raw is REQUIRED:
            return self.problem(key, "missing, this key is required")
        try:
            if isinstance(declared.kind, Entries):
                return declared.kind.read(self, key, raw)
            value = declared.kind(raw)
        except Invalid as exc:
            return self.problem(key, str(exc))
        return self.root / value if isinstance(value, Path) and not value.is_absolute() else value

    def child(self, key: str, data: Any) -> Section:
        """The section ``<this>.<key>`` (an entry of a mapping read from this one)."""
        return Section(self.key(key), data, self.problems, self.root)

    def finish(self, ignore: Callable[[str], bool] = lambda key: False) -> None:
        """Record every key given but never read (a typo), with a guess when one is close."""
        for key in sorted(set(self.data) - self.used, key=str):
            if not ignore(str(key)):
                self.problem(str(key), f"unknown key ({did_you_mean(str(key), self.used)}"
                                       f"known keys: {', '.join(sorted(self.used))})")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``did you mean X? `` for the closest of ``choices``, else ``check the spelling; ``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"did you mean {close[0]}? " if close else "check the spelling; "


def read(cls: type, section: Section, *, defaults: dict[str, Any] | None = None, **given: Any) -> Any:
    """``cls`` built from every key it declares, read from ``section``; ``given`` are its other fields.

    ``defaults`` replaces the declared default of the keys it names (None: no default, the
    key's kind says what was expected).
    """
    defaults = defaults or {}
    values = {name: section.get(name, declared, defaults.get(name, _UNSET)) for name, declared in settings(cls).items()}
    return cls(**values, **given)


def joined(cls: type, keys: Iterable[type] = (), fields: Iterable[tuple[str, type]] = ()) -> type:
    """``cls`` (a frozen, keyword-only dataclass) with more fields after its own, under its own name.

    ``keys``: dataclasses whose settings join ``cls``'s (one section whose keys several
    modules declare); ``fields``: more ``(name, type)`` fields, each a section read apart.
    """
    bases = tuple(dict.fromkeys(reversed(tuple(keys))))  # dataclass fields come in reverse MRO order
    fields = list(fields)
    names = [f.name for base in (cls, *bases) for f in dataclasses.fields(base)] + [name for name, _ in fields]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise TypeError(f"{cls.__name__}: declared twice: {', '.join(twice)}")  # one would hide the other
    made = dataclasses.make_dataclass(cls.__name__, fields, bases=(*bases, cls), frozen=True, kw_only=True,
                                      namespace={"__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    made.__module__ = cls.__module__  # where it is found by name, as ``cls`` was
    return made


class Entries:
    """The kind of a key whose value maps names to sections of ``cls`` (pueue groups, Slurm partitions).

    Each entry is read with ``read(cls, ...)`` in the section ``<key>.<name>`` and gets its
    ``name``; a name must match ``pattern``. ``names_alone`` also accepts a list of names
    (each then takes every default).
    """

    def __init__(self, cls: type, noun: str, pattern: Any, expected: str, *, names_alone: bool = False):
        self.cls, self.noun, self.pattern, self.expected, self.names_alone = cls, noun, pattern, expected, names_alone

    def read(self, section: Section, key: str, raw: Any) -> tuple:
        if self.names_alone and isinstance(raw, list):
            raw = {name: {} for name in raw}
        if not isinstance(raw, dict) or not raw:
            raise bad(raw, self.expected)
        return tuple(self._entries(section, key, raw))

    def _entries(self, section: Section, key: str, raw: dict) -> Iterator[Any]:
        for name, spec in raw.items():
            if not isinstance(name, str) or not self.pattern.match(name):
                section.problem(key, f"got {self.noun} {name!r}, expected letters, digits, '_', '-', '.'")
                continue
            entry = section.child(f"{key}.{name}", spec)
            yield read(self.cls, entry, name=name)
            entry.finish()


def rows(prefix: str, cls: type) -> list[tuple[str, Setting]]:
    """README's rows for the keys ``cls`` declares, each named ``<prefix>.<key>``; a key of named
    entries is followed by the keys of one entry, ``<prefix>.<key>.<name>.<entry key>``."""
    found = []
    for name, declared in settings(cls).items():
        found.append((f"{prefix}.{name}", declared))
        if isinstance(declared.kind, Entries):
            found.extend(rows(f"{prefix}.{name}.<name>", declared.kind.cls))
    return found


def markdown_table(table: Iterable[tuple[str, Setting]]) -> str:
    """README's configuration table: key, default, meaning."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, declared in table:
        cells = (f"`{key}`", declared.shown_default(), declared.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# -- kinds every section uses ------------------------------------------------------------------

def number(*, minimum: float = 0, positive: bool = False, integer: bool = False) -> Callable[[Any], Any]:
    """A number (``integer``: a whole one) of at least ``minimum``; ``positive``: more than it."""
    noun = "an integer" if integer else "a number"
    bound = f"> {minimum}" if positive else f">= {minimum}"

    def kind(value: Any) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise bad(value, noun)
        if value < minimum or (positive and value <= 0):
            raise bad(value, f"{noun} {bound}")
        return value
    return kind


def text(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise bad(value, "a non-empty string")
    return value


def flag(value: Any) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise bad(value, "true or false")
    return value


def regex(value: Any) -> str:
    """A regular expression (Python ``re``)."""
    try:
        re.compile(text(value))
    except re.error as exc:
        raise bad(value, f"a regular expression ({exc})") from None
    return value


INSECURE_SSH_OPTION = re.compile(
    r"StrictHostKeyChecking\s*=?\s*(no|off|accept-new)|PasswordAuthentication\s*=?\s*yes|"
    r"BatchMode\s*=?\s*no|UserKnownHostsFile\s*=?\s*/dev/null", re.IGNORECASE)


def command_line(value: Any) -> tuple[str, ...]:
    """A command line split into words (no shell), refusing options that weaken ssh's checks."""
    value = text(value)
    if INSECURE_SSH_OPTION.search(value):
        raise bad(value, "no option that weakens key or host-key checking (hosts are verified against "
                         "hpc.known_hosts_file)")
    try:
        words = tuple(shlex.split(value))
    except ValueError as exc:
        raise bad(value, f"a command line ({exc})") from None
    if not words:
        raise bad(value, "a command line")
    return words


def local_path(value: Any) -> Path:
    """A path; ``~`` is expanded, and a relative one is taken from the section's root."""
    return Path(os.path.expanduser(text(value)))


def choice(*choices: str) -> Callable[[Any], str]:
    """One of ``choices``."""
    def kind(value: Any) -> str:
        if value not in choices:
            raise bad(value, f"one of {', '.join(choices)}")
        return value
    return kind


def optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``kind``, or None (the key absent or null)."""
    def maybe(value: Any) -> Any:
        return None if value is None else kind(value)
    return maybe


def replace_between(document: str, begin: str, end: str, block: str) -> str:
    """``document`` with the lines between the marker lines ``begin`` and ``end`` replaced by ``block``."""
    start = document.index(begin + "\n") + len(begin) + 1
    stop = document.index(end, start)
    return document[:start] + block + document[stop:]
