"""Room namespaces: the options and permission rules of each family of rooms (sans-I/O).

A room ``chat:lobby`` is in namespace ``chat``; a room without ``:`` is in the default namespace.
Namespaces come from a TOML file (``--namespaces-file``), read once at start and validated with a
one-line error naming the file and the key. Without a file every room, with or without ``:``, is
in the default namespace, whose options are the flags (``--history-size``, ``--history-ttl``):
existing clients keep working. With a file, a room whose prefix names no namespace there is
refused (``unknown_namespace``). docs/PROTOCOL.md ("Namespaces") documents the format::

    [default]                # optional: the rooms without ':'
    join = "authenticated"

    [namespaces.chat]
    join = "authenticated"   # anyone | authenticated | granted
    publish = "members"      # members | server | granted
    presence = true          # presence replies and entries
    join_leave = true        # user_joined / user_left events
    history_size = 100
    history_ttl = 86400
    recovery = true          # join with since replays what was missed
    max_members = 0          # distinct users; 0 = no limit
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from roomcast.config import Config

#: Who may join: every connection (anonymous ones too), every connection with a verified identity
#: (with --auth none: every connection), or only a connection whose token grants the room.
JOIN_RULES: Final = ("anyone", "authenticated", "granted")
#: Who may publish: the room's members, nobody but the server (backends, through the server
#: API), or only a connection whose token grants publishing there.
PUBLISH_RULES: Final = ("members", "server", "granted")
NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}")


@dataclass(frozen=True, slots=True)
class Namespace:
    """The options of one namespace. ``name`` is "" for the default namespace."""

    name: str = ""
    join: str = "authenticated"
    publish: str = "members"
    presence: bool = True
    join_leave: bool = True
    history_size: int = 100
    history_ttl: float = 86400.0
    recovery: bool = True
    max_members: int = 0

    def problems(self) -> list[str]:
        """What is wrong with these options, one phrase each ("join must be ...")."""
        found = []
        if self.join not in JOIN_RULES:
            found.append("join must be one of " + ", ".join(JOIN_RULES))
        if self.publish not in PUBLISH_RULES:
            found.append("publish must be one of " + ", ".join(PUBLISH_RULES))
        if self.history_size < 0:
            found.append("history_size must be 0 or more")
        if not math.isfinite(self.history_ttl) or self.history_ttl < 0:
            found.append("history_ttl must be a finite number, 0 or more")
        if self.max_members < 0:
            found.append("max_members must be 0 (no limit) or more")
        if self.max_members and not self.presence:
            found.append("max_members needs presence = true (members are counted there)")
        return found


#: Option name -> the Python type a TOML value must have (bool is checked before int: in Python
#: a bool is an int, in TOML it is not).
_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    f.name: ((str,) if f.type == "str" else (bool,) if f.type == "bool"
             else (int,) if f.type == "int" else (int, float))
    for f in dataclasses.fields(Namespace) if f.name != "name"
}


@dataclass(frozen=True, slots=True)
class Namespaces:
    """Every namespace of the node. ``configured`` is False when no file was given: then every
    room is in ``default``."""

    default: Namespace = field(default_factory=Namespace)
    named: Mapping[str, Namespace] = field(default_factory=dict)
    configured: bool = False

    def resolve(self, room: str) -> Namespace | None:
        """The namespace of ``room``, or None when its prefix names no configured namespace."""
        if not self.configured:
            return self.default
        prefix, colon, _ = room.partition(":")
        if not colon:
            return self.default
        return self.named.get(prefix)

    def retention(self, room: str) -> tuple[int, float]:
        """(history size, history TTL in seconds) of ``room``'s namespace (the default's for a
        room of no namespace: nothing is ever stored there, it cannot be published to)."""
        ns = self.resolve(room) or self.default
        return ns.history_size, ns.history_ttl


def default_namespace(config: Config) -> Namespace:
    """The default namespace as the flags describe it."""
    return Namespace(history_size=config.history_size, history_ttl=config.history_ttl)


def load(config: Config) -> Namespaces:
    """The node's namespaces: from ``--namespaces-file`` if given, else the default only.

    Raises ValueError with a one-line message naming the file and the key at fault.
    """
    if config.namespaces_file is None:
        return Namespaces(default_namespace(config))
    path = config.namespaces_file
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"--namespaces-file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--namespaces-file: {path} is not UTF-8") from None
    return parse(text, config, source=path)


def parse(text: str, config: Config, source: str = "<namespaces>") -> Namespaces:
    """Namespaces from TOML text; see the module docstring for the format."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"default", "namespaces"})
    if unknown:
        raise ValueError(f"{source}: unknown table {unknown[0]!r} (expected default, namespaces)")
    base = default_namespace(config)
    default = _namespace(document.get("default", {}), base, "default", source)
    tables = document.get("namespaces", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{source}: namespaces must be a table of tables")
    named = {}
    for name, table in tables.items():
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"{source}: namespace name {name!r} must be 1-32 characters of "
                             "letters, digits and _ . -")
        named[name] = _namespace(table, dataclasses.replace(base, name=name),
                                 f"namespaces.{name}", source)
    return Namespaces(default, named, configured=True)


def _namespace(table: Any, base: Namespace, where: str, source: str) -> Namespace:
    if not isinstance(table, dict):
        raise ValueError(f"{source}: {where} must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kinds = _TYPES.get(key)
        if kinds is None:
            raise ValueError(f"{source}: {where}.{key} is not an option (known: "
                             + ", ".join(_TYPES) + ")")
        if isinstance(value, bool) is not (kinds == (bool,)) or not isinstance(value, kinds):
            raise ValueError(f"{source}: {where}.{key} must be a {_kind(kinds)}")
        values[key] = float(value) if isinstance(value, int | float) and kinds == (
            int, float) else value
    namespace = dataclasses.replace(base, **values)
    problems = namespace.problems()
    if problems:
        raise ValueError(f"{source}: {where}: {problems[0]}")
    return namespace


def _kind(kinds: tuple[type, ...]) -> str:
    return {(str,): "string", (bool,): "boolean (true or false)", (int,): "whole number",
            (int, float): "number"}[kinds]
