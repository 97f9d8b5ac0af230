"""Configuration from flags and environment: precedence, conversion and one-line errors."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from roomcast.config import Config, add_arguments, load_config, markdown_table


def flags(*argv: str) -> argparse.Namespace:
    """Parse command-line flags with the real parser, as `roomcast node` does."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def load_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ValueError) as caught:
        load_config(flags(*argv), env or {})
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_apply_when_neither_flag_nor_env_is_set() -> None:
    """With no flags and no environment, every setting has its documented default."""
    cfg = load_config(flags(), {})
    assert (cfg.host, cfg.port, cfg.redis_url, cfg.redis_prefix) == (
        "127.0.0.1", 8000, None, "roomcast"
    )
    assert (cfg.rate_limit, cfg.rate_burst, cfg.history_size, cfg.compression) == (
        20.0, 40, 100, False
    )
    assert cfg.trusted_proxies == ()
    assert cfg.clustered is False


def test_env_beats_default() -> None:
    """An environment variable overrides the default."""
    cfg = load_config(flags(), {"ROOMCAST_PORT": "9002", "ROOMCAST_RATE_LIMIT": "2.5"})
    assert (cfg.port, cfg.rate_limit) == (9002, 2.5)


def test_flag_beats_env() -> None:
    """A command-line flag overrides the environment variable of the same setting."""
    cfg = load_config(
        flags("--port", "9001", "--redis-url", "redis://flag:6379/0"),
        {"ROOMCAST_PORT": "9002", "ROOMCAST_REDIS_URL": "redis://env:6379/0"},
    )
    assert (cfg.port, cfg.redis_url) == (9001, "redis://flag:6379/0")
    assert cfg.clustered is True


def test_unrelated_environment_variables_are_ignored() -> None:
    """Only ROOMCAST_-prefixed variables configure the node."""
    cfg = load_config(flags(), {"PORT": "1", "port": "2", "roomcast_port": "3"})
    assert cfg.port == 8000


def test_load_config_without_a_namespace_reads_the_environment() -> None:
    """load_config(None, env) configures from the environment alone."""
    assert load_config(None, {"ROOMCAST_HOST": "0.0.0.0"}).host == "0.0.0.0"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), (" on ", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_boolean_settings_accept_the_usual_spellings(raw: str, expected: bool) -> None:
    """Booleans accept 1/true/yes/on and 0/false/no/off/empty, in any case."""
    assert load_config(None, {"ROOMCAST_COMPRESSION": raw}).compression is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1",)),
        ("10.0.0.1,10.0.0.2", ("10.0.0.1", "10.0.0.2")),
        (" 10.0.0.1 , ::1 ,, ", ("10.0.0.1", "::1")),
        ("", ()),
    ],
)
def test_trusted_proxies_parses_a_comma_separated_list(raw: str, expected: tuple[str, ...]) -> None:
    """trusted_proxies is split on commas, trimmed, and empty items dropped."""
    assert load_config(None, {"ROOMCAST_TRUSTED_PROXIES": raw}).trusted_proxies == expected
    assert load_config(flags("--trusted-proxies", raw), {}).trusted_proxies == expected


@pytest.mark.parametrize("name", ["REDIS_URL", "ADMIN_TOKEN"])
def test_empty_optional_strings_mean_absent(name: str) -> None:
    """An empty ROOMCAST_REDIS_URL or ROOMCAST_ADMIN_TOKEN is the same as not setting it."""
    cfg = load_config(None, {f"ROOMCAST_{name}": ""})
    assert getattr(cfg, name.lower()) is None


@pytest.mark.parametrize(
    ("flag", "env", "raw"),
    [
        ("--port", "ROOMCAST_PORT", "eighty"),
        ("--rate-limit", "ROOMCAST_RATE_LIMIT", "fast"),
        ("--history-size", "ROOMCAST_HISTORY_SIZE", "1.5"),
        ("--compression", "ROOMCAST_COMPRESSION", "maybe"),
    ],
)
def test_unparsable_values_name_the_flag_or_env_var_that_held_them(
    flag: str, env: str, raw: str
) -> None:
    """A value that cannot be converted is reported in one line naming where it came from."""
    assert load_error(flag, raw) == f"{flag}: invalid value {raw!r}"
    assert load_error(env={env: raw}) == f"{env}: invalid value {raw!r}"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"ROOMCAST_MAX_MESSAGE_SIZE": "255"}, "--max-message-size"),
        ({"ROOMCAST_RATE_LIMIT": "0"}, "--rate-limit"),
        ({"ROOMCAST_RATE_BURST": "0"}, "--rate-burst"),
        ({"ROOMCAST_HISTORY_SIZE": "-1"}, "--history-size"),
        ({"ROOMCAST_HISTORY_TTL": "-1"}, "--history-ttl"),
        ({"ROOMCAST_LOG_FORMAT": "xml"}, "--log-format"),
        ({"ROOMCAST_REDIS_URL": "http://localhost"}, "--redis-url"),
    ],
)
def test_out_of_range_values_are_refused_in_one_line(env: dict[str, str], fragment: str) -> None:
    """Values that convert but make no sense are refused with a one-line message naming them."""
    assert fragment in load_error(env=env)


def test_several_problems_are_reported_together_on_one_line() -> None:
    """All range problems are listed at once, so the user fixes them in one go."""
    message = load_error(
        env={"ROOMCAST_MAX_MESSAGE_SIZE": "1", "ROOMCAST_LOG_FORMAT": "xml"}
    )
    assert "--max-message-size" in message
    assert "--log-format" in message


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380", "unix:///tmp/r.sock"])
def test_redis_url_schemes_accepted(url: str) -> None:
    """redis://, rediss:// and unix:// URLs switch the node to cluster mode."""
    assert load_config(None, {"ROOMCAST_REDIS_URL": url}).clustered is True


def test_out_of_range_values_name_the_flag_or_env_var() -> None:
    """A value out of range is reported naming the flag/env var, like an unparsable one."""
    assert "--max-message-size" in load_error("--max-message-size", "100")
    assert "ROOMCAST_MAX_MESSAGE_SIZE" in load_error(env={"ROOMCAST_MAX_MESSAGE_SIZE": "100"})


@pytest.mark.parametrize(
    "env",
    [
        {"ROOMCAST_RATE_LIMIT": "nan"},
        {"ROOMCAST_PORT": "70000"},
        {"ROOMCAST_LOG_LEVEL": "loud"},
    ],
)
def test_nonsense_values_are_refused(env: dict[str, str]) -> None:
    """A NaN rate, an impossible port or an unknown log level raise ValueError at startup."""
    load_error(env=env)


def test_node_id_defaults_to_a_non_empty_name_unique_per_config() -> None:
    """Two nodes started without --node-id get different, non-empty names."""
    first, second = load_config(None, {}), load_config(None, {})
    assert first.node_id
    assert second.node_id
    assert first.node_id != second.node_id


def test_node_id_given_is_kept() -> None:
    """An explicit node id is used as is."""
    assert load_config(flags("--node-id", "edge-1"), {}).node_id == "edge-1"


def test_config_is_immutable() -> None:
    """A running node cannot change its configuration."""
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


def test_every_setting_has_a_flag_an_env_var_and_a_table_row() -> None:
    """--help and the README table list every setting with its environment variable."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    table = markdown_table()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        env = "ROOMCAST_" + f.name.upper()
        assert flag in help_text
        assert f"`{flag}` | `{env}`" in table
