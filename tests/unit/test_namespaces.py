"""Namespaces from TOML: what each room resolves to, and a one-line error for every bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from roomcast.config import Config
from roomcast.namespaces import Namespace, load, parse

CONFIG = Config(node_id="n", history_size=50, history_ttl=600.0)

GOOD = """
[default]
join = "anyone"

[namespaces.chat]
join = "authenticated"
max_members = 10
history_ttl = 60

[namespaces.dash]
publish = "server"
presence = false
join_leave = false
history_size = 0
"""


def test_rooms_resolve_to_their_namespace_and_unknown_prefixes_to_none() -> None:
    """chat:x is in chat, a room without ':' in the default, zzz:x in none; the flags fill in
    what a namespace does not set."""
    spaces = parse(GOOD, CONFIG)
    chat = spaces.resolve("chat:lobby")
    assert chat == Namespace("chat", join="authenticated", max_members=10, history_size=50,
                             history_ttl=60.0)
    assert spaces.resolve("lobby") == Namespace("", join="anyone", history_size=50,
                                                history_ttl=600.0)
    assert spaces.resolve("zzz:x") is None
    assert spaces.resolve("chat:a:b") == chat  # Only the first ':' separates the namespace.
    assert spaces.retention("dash:cpu") == (0, 600.0)


def test_without_a_file_every_room_is_in_the_default_namespace() -> None:
    """No --namespaces-file: a:b is a default-namespace room, as before namespaces."""
    spaces = load(CONFIG)
    assert spaces.resolve("a:b") == spaces.resolve("b") == Namespace(
        history_size=50, history_ttl=600.0)


@pytest.mark.parametrize(("text", "message"), [
    ("[namespaces.chat]\njoin = \"everyone\"", "namespaces.chat: join must be one of anyone, "
     "authenticated, granted"),
    ("[namespaces.chat]\npublish = \"all\"", "publish must be one of members, server, granted"),
    ("[namespaces.chat]\njion = \"anyone\"", "namespaces.chat.jion is not an option"),
    ("[namespaces.chat]\npresence = \"yes\"", "namespaces.chat.presence must be a boolean"),
    ("[namespaces.chat]\nhistory_size = 1.5", "history_size must be a whole number"),
    ("[namespaces.chat]\nhistory_size = true", "history_size must be a whole number"),
    ("[namespaces.chat]\nhistory_size = -1", "history_size must be 0 or more"),
    ("[namespaces.chat]\nmax_members = 5\npresence = false", "max_members needs presence"),
    ("[namespaces.\"a b\"]\njoin = \"anyone\"", "namespace name 'a b' must be"),
    ("[namespace.chat]\njoin = \"anyone\"", "unknown table 'namespace'"),
    ("[namespaces.chat\njoin = 1", "not valid TOML"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(text: str, message: str) -> None:
    """Every mistake stops the node with one line that names the file and what is wrong."""
    with pytest.raises(ValueError) as refused:
        parse(text, CONFIG, source="ns.toml")
    assert str(refused.value).startswith("ns.toml: ")
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_an_unreadable_file_names_the_flag(tmp_path: Path) -> None:
    """A missing file: --namespaces-file: cannot read <path>."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ValueError, match="--namespaces-file: cannot read"):
        load(Config(node_id="n", namespaces_file=str(missing)))
