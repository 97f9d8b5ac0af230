"""Token verification (service/auth.py) and `roomcast token`: keys, algorithms, claims, kinds,
JWKS caching against a real local HTTP server, key rotation without a restart."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from roomcast.config import Config
from roomcast.service import auth as auth_module
from roomcast.service.auth import (
    ACTIONS,
    JWKS_MIN_REFETCH,
    JWKS_TTL,
    Authenticator,
    Claims,
    Grant,
    RoomClaims,
    TokenError,
)
from roomcast.tools import token_cli
from tests.fakes import FakeClock, JwksServer

SECRET = "s" * 32
OTHER_SECRET = "t" * 32

Make = Callable[..., Awaitable[Authenticator]]


def payload(**claims: Any) -> dict[str, Any]:
    """A valid connection-token payload for alice, with ``claims`` added (None removes one)."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 60}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


def hs256(secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode(payload(**claims), secret, algorithm="HS256")


def signed(key: Any, alg: str, kid: str | None = None, **claims: Any) -> str:
    return jwt.encode(payload(**claims), key, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(*keys: Any) -> bytes:
    return b"".join(k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for k in keys)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256",
            "use": "sig"}


async def refusal(call: Awaitable[Any]) -> TokenError:
    with pytest.raises(TokenError) as caught:
        await call
    assert "\n" not in caught.value.message
    return caught.value


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Build and start an Authenticator with --auth jwt and the given Config fields."""
    made: list[Authenticator] = []

    async def build(clock: Callable[[], float] = time.monotonic, **fields: Any) -> Authenticator:
        authenticator = Authenticator(Config(auth="jwt", **fields), clock=clock)
        await authenticator.start()
        made.append(authenticator)
        return authenticator

    yield build
    for authenticator in made:
        await authenticator.close()


@pytest.fixture
def jwks(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    server = JwksServer([jwk(rsa_key, "k1")])
    yield server
    server.stop()


# --- keys and algorithms ----------------------------------------------------------------------


async def test_valid_hs256_token_gives_its_claims(make: Make) -> None:
    """An HS256 token signed with --jwt-secret yields sub, name, info and exp."""
    authenticator = await make(jwt_secret=SECRET)
    token = hs256(name="Alice", info={"avatar": "a.png"}, exp=int(time.time()) + 100)
    claims = await authenticator.connection(token)
    assert claims == Claims("alice", "Alice", {"avatar": "a.png"}, (), claims.expires_at)
    assert claims.expires_at == pytest.approx(time.time() + 100, abs=2)
    assert authenticator.enabled


async def test_valid_rs256_token_verifies_with_the_pem_key(
        make: Make, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token verifies with the RSA public key of --jwt-public-key."""
    (tmp_path / "keys.pem").write_bytes(public_pem(rsa_key))
    authenticator = await make(jwt_public_key=str(tmp_path / "keys.pem"))
    assert (await authenticator.connection(signed(rsa_key, "RS256"))).user_id == "alice"


async def test_valid_es256_token_verifies_with_the_second_pem_block(
        make: Make, tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    """An ES256 token verifies with an EC key that follows an RSA key in the PEM file."""
    (tmp_path / "keys.pem").write_bytes(public_pem(rsa_key, ec_key))
    authenticator = await make(jwt_public_key=str(tmp_path / "keys.pem"))
    assert (await authenticator.connection(signed(ec_key, "ES256"))).user_id == "alice"
    assert (await authenticator.connection(signed(rsa_key, "PS256"))).user_id == "alice"


async def test_wrong_signature_is_refused(make: Make) -> None:
    """A token signed with another secret: invalid, signature does not verify."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(OTHER_SECRET)))
    assert (error.reason, error.message) == ("invalid", "signature does not verify")


async def test_alg_none_is_refused(make: Make) -> None:
    """An unsigned token (alg none) is refused whatever its claims."""
    authenticator = await make(jwt_secret=SECRET)
    token = jwt.encode(payload(), None, algorithm="none")
    error = await refusal(authenticator.connection(token))
    assert (error.reason, error.message) == ("invalid", "algorithm not allowed")
    for alg in (["HS256"], None, "HS1"):  # Not a string, absent, unknown.
        body = b64(json.dumps(payload()).encode())
        token = f"{b64(json.dumps({'alg': alg}).encode())}.{body}.{b64(b'sig')}"
        error = await refusal(authenticator.connection(token))
        assert (error.reason, error.message) == ("invalid", "algorithm not allowed")


async def test_hs256_signed_with_the_public_pem_is_refused(
        make: Make, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """HS/RS confusion: an HS256 token whose HMAC key is the public PEM is refused when only
    --jwt-public-key is configured (the public key is never an HMAC secret)."""
    pem = public_pem(rsa_key)
    (tmp_path / "keys.pem").write_bytes(pem)
    authenticator = await make(jwt_public_key=str(tmp_path / "keys.pem"))
    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64(json.dumps(payload()).encode()))
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    error = await refusal(authenticator.connection(f"{signing_input}.{b64(signature)}"))
    assert (error.reason, error.message) == ("invalid", "algorithm not allowed")


async def test_malformed_token_is_refused(make: Make) -> None:
    """Something that is not a JWT: invalid, malformed token."""
    authenticator = await make(jwt_secret=SECRET)
    for token in ("", "abc", "a.b.c", "x" * 10_000):
        error = await refusal(authenticator.connection(token))
        assert (error.reason, error.message) == ("invalid", "malformed token")


# --- registered claims --------------------------------------------------------------------------


async def test_expired_token_is_expired(make: Make) -> None:
    """exp a minute ago (beyond the 5 s leeway): reason expired."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(exp=int(time.time()) - 60)))
    assert (error.reason, error.message) == ("expired", "token expired")


async def test_nbf_in_the_future_is_refused(make: Make) -> None:
    """nbf a minute ahead: invalid, token not valid yet."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(nbf=int(time.time()) + 60)))
    assert (error.reason, error.message) == ("invalid", "token not valid yet")


async def test_clock_skew_within_the_leeway_is_accepted(make: Make) -> None:
    """exp 2 s ago and nbf 2 s ahead pass with the default 5 s leeway."""
    authenticator = await make(jwt_secret=SECRET)
    now = int(time.time())
    claims = await authenticator.connection(hs256(exp=now - 2, nbf=now + 2, iat=now + 2))
    assert claims.user_id == "alice"


async def test_wrong_audience_is_refused(make: Make) -> None:
    """With --jwt-audience, a token for another audience is refused."""
    authenticator = await make(jwt_secret=SECRET, jwt_audience="roomcast")
    error = await refusal(authenticator.connection(hs256(aud="other")))
    assert (error.reason, error.message) == ("invalid", "audience does not match")
    assert (await authenticator.connection(hs256(aud="roomcast"))).user_id == "alice"


async def test_missing_audience_is_refused_when_configured(make: Make) -> None:
    """With --jwt-audience, a token without aud is refused."""
    authenticator = await make(jwt_secret=SECRET, jwt_audience="roomcast")
    error = await refusal(authenticator.connection(hs256()))
    assert (error.reason, error.message) == ("invalid", "missing claim aud")


async def test_audience_is_ignored_when_not_configured(make: Make) -> None:
    """Without --jwt-audience, a token that carries an aud is still accepted."""
    authenticator = await make(jwt_secret=SECRET)
    assert (await authenticator.connection(hs256(aud="anything"))).user_id == "alice"


async def test_wrong_issuer_is_refused(make: Make) -> None:
    """With --jwt-issuer, a token from another issuer is refused."""
    authenticator = await make(jwt_secret=SECRET, jwt_issuer="https://id.example")
    error = await refusal(authenticator.connection(hs256(iss="https://evil.example")))
    assert (error.reason, error.message) == ("invalid", "issuer does not match")
    assert (await authenticator.connection(hs256(iss="https://id.example"))).user_id == "alice"


async def test_missing_issuer_is_refused_when_configured(make: Make) -> None:
    """With --jwt-issuer, a token without iss is refused."""
    authenticator = await make(jwt_secret=SECRET, jwt_issuer="https://id.example")
    error = await refusal(authenticator.connection(hs256()))
    assert (error.reason, error.message) == ("invalid", "missing claim iss")


async def test_missing_sub_is_refused(make: Make) -> None:
    """A token without sub: invalid, missing claim sub."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(sub=None)))
    assert (error.reason, error.message) == ("invalid", "missing claim sub")


async def test_missing_exp_is_refused(make: Make) -> None:
    """A token without exp (one that would never expire): invalid, missing claim exp."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(exp=None)))
    assert (error.reason, error.message) == ("invalid", "missing claim exp")


@pytest.mark.parametrize("sub", ["ali\x00ce", "alice\u202e", "a" * 65, 42])
async def test_bad_sub_is_refused(make: Make, sub: Any) -> None:
    """A sub with a control or bidi character, longer than 64 or not a string is refused."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(sub=sub)))
    assert error.reason == "invalid" and error.message.startswith("claim sub must be")


async def test_oversized_info_is_refused(make: Make) -> None:
    """An info claim over 1024 encoded bytes is refused; a name must be printable too."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(info="x" * 1100)))
    assert error.message == "claim info is longer than 1024 bytes"
    error = await refusal(authenticator.connection(hs256(name="bad\nname")))
    assert error.message.startswith("claim name must be")


# --- grants and kinds -------------------------------------------------------------------------


async def test_rooms_claim_becomes_grants_matching_globs(make: Make) -> None:
    """rooms {pattern: actions} becomes Grants; allows() matches fnmatch globs, case-sensitive."""
    authenticator = await make(jwt_secret=SECRET)
    claims = await authenticator.connection(
        hs256(rooms={"chat:*": ["join", "publish"], "news": ["join"]}))
    assert claims.grants == (Grant("chat:*", frozenset({"join", "publish"})),
                             Grant("news", frozenset({"join"})))
    chat, news = claims.grants
    assert chat.allows("chat:general", "publish")
    assert not chat.allows("chat:general", "history")
    assert not chat.allows("CHAT:general", "join")
    assert news.allows("news", "join") and not news.allows("newsroom", "join")


@pytest.mark.parametrize("rooms", [
    ["chat:*"],
    {"chat:*": ["join", "fly"]},
    {"chat:*": "join"},
    {"": ["join"]},
    {"r" * 129: ["join"]},
    {f"room{n}": ["join"] for n in range(101)},
])
async def test_bad_rooms_claim_is_refused(make: Make, rooms: Any) -> None:
    """A rooms claim that is not an object of 1-128 character patterns to known actions, or
    has more than 100 entries, refuses the whole token."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(rooms=rooms)))
    assert error.reason == "invalid" and error.message.startswith("claim rooms")


async def test_room_token_grants_one_room(make: Make) -> None:
    """A room token yields its room and actions (all four when it names none)."""
    authenticator = await make(jwt_secret=SECRET)
    claims = await authenticator.room(hs256(room="vip", actions=["join"]), "alice", "vip")
    assert claims == RoomClaims("alice", "vip", frozenset({"join"}), claims.expires_at)
    claims = await authenticator.room(hs256(room="vip"), "alice", "vip")
    assert claims.actions == frozenset(ACTIONS)


async def test_room_token_is_not_a_connection_token(make: Make) -> None:
    """A token with a room claim is refused where a connection token is expected."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.connection(hs256(room="vip")))
    assert (error.reason, error.message) == ("invalid", "a room token is not a connection token")


async def test_connection_token_is_not_a_room_token(make: Make) -> None:
    """A token without a room claim is refused where a room token is expected."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.room(hs256(), "alice", "vip"))
    assert (error.reason, error.message) == ("invalid", "not a room token")


async def test_room_token_for_another_user_is_refused(make: Make) -> None:
    """A room token whose sub is not the connection's user is refused."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.room(hs256(room="vip", sub="bob"), "alice", "vip"))
    assert (error.reason, error.message) == ("invalid", "room token is for another user")


async def test_room_token_for_another_room_is_refused(make: Make) -> None:
    """A room token for room A does not open room B."""
    authenticator = await make(jwt_secret=SECRET)
    error = await refusal(authenticator.room(hs256(room="vip"), "alice", "lobby"))
    assert (error.reason, error.message) == ("invalid", "room token is for another room")


# --- key files --------------------------------------------------------------------------------


async def test_every_secret_of_the_secret_file_is_accepted(make: Make, tmp_path: Path) -> None:
    """Two secrets in --jwt-secret-file (rotation) and --jwt-secret are all accepted."""
    third = "u" * 32
    (tmp_path / "secrets").write_text(f"{OTHER_SECRET}\n\n  {third}  \n")
    authenticator = await make(jwt_secret=SECRET, jwt_secret_file=str(tmp_path / "secrets"))
    for secret in (SECRET, OTHER_SECRET, third):
        assert (await authenticator.connection(hs256(secret))).user_id == "alice"
    error = await refusal(authenticator.connection(hs256("v" * 32)))
    assert error.message == "signature does not verify"


async def test_rewritten_secret_file_is_picked_up(make: Make, tmp_path: Path) -> None:
    """A secret file rewritten with a new secret is re-read (mtime changed, a second later on
    the authenticator's clock): the new secret works, the old one no longer does."""
    clock = FakeClock()
    path = tmp_path / "secrets"
    path.write_text(SECRET + "\n")
    authenticator = await make(clock=clock, jwt_secret_file=str(path))
    assert (await authenticator.connection(hs256(SECRET))).user_id == "alice"
    mtime = path.stat().st_mtime
    path.write_text(OTHER_SECRET + "\n")
    os.utime(path, (mtime + 10, mtime + 10))
    # Within the second, the file is not looked at again.
    assert (await authenticator.connection(hs256(SECRET))).user_id == "alice"
    clock.advance(1.0)
    assert (await authenticator.connection(hs256(OTHER_SECRET))).user_id == "alice"
    error = await refusal(authenticator.connection(hs256(SECRET)))
    assert error.message == "signature does not verify"


async def test_emptied_key_file_keeps_the_old_keys(
        make: Make, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """A PEM file that becomes empty or goes away keeps the keys read before (a warning)."""
    clock = FakeClock()
    path = tmp_path / "keys.pem"
    path.write_bytes(public_pem(rsa_key))
    authenticator = await make(clock=clock, jwt_public_key=str(path))
    mtime = path.stat().st_mtime
    path.write_bytes(b"")
    os.utime(path, (mtime + 10, mtime + 10))
    clock.advance(1.0)
    assert (await authenticator.connection(signed(rsa_key, "RS256"))).user_id == "alice"
    path.unlink()
    clock.advance(1.0)
    assert (await authenticator.connection(signed(rsa_key, "RS256"))).user_id == "alice"


async def test_rewritten_pem_file_is_picked_up(
        make: Make, tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
        rsa_key2: rsa.RSAPrivateKey) -> None:
    """A PEM file rewritten with a new public key verifies tokens of the new key."""
    clock = FakeClock()
    path = tmp_path / "keys.pem"
    path.write_bytes(public_pem(rsa_key))
    authenticator = await make(clock=clock, jwt_public_key=str(path))
    await refusal(authenticator.connection(signed(rsa_key2, "RS256")))
    mtime = path.stat().st_mtime
    path.write_bytes(public_pem(rsa_key2))
    os.utime(path, (mtime + 10, mtime + 10))
    clock.advance(1.0)
    assert (await authenticator.connection(signed(rsa_key2, "RS256"))).user_id == "alice"


async def test_unreadable_pem_file_fails_start_naming_the_flag(tmp_path: Path) -> None:
    """A missing or malformed --jwt-public-key file is a one-line ValueError at start."""
    for path, content in ((tmp_path / "missing.pem", None), (tmp_path / "bad.pem", b"junk")):
        if content is not None:
            path.write_bytes(content)
        authenticator = Authenticator(Config(auth="jwt", jwt_public_key=str(path)))
        with pytest.raises(ValueError, match=r"^--jwt-public-key: ") as caught:
            await authenticator.start()
        assert "\n" not in str(caught.value)


async def test_bad_secret_file_fails_start_naming_the_flag(tmp_path: Path) -> None:
    """An empty --jwt-secret-file, or one with a short secret, is a ValueError at start that
    names the flag and never shows the secret."""
    path = tmp_path / "secrets"
    for content in ("\n\n", f"{SECRET}\nshort-secret\n"):
        path.write_text(content)
        authenticator = Authenticator(Config(auth="jwt", jwt_secret_file=str(path)))
        with pytest.raises(ValueError, match=r"^--jwt-secret-file: ") as caught:
            await authenticator.start()
        assert "short-secret" not in str(caught.value)


# --- JWKS -------------------------------------------------------------------------------------


async def test_jwks_token_is_accepted(
        make: Make, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    """A token whose kid is in the JWK set verifies; the set was fetched once, at start."""
    authenticator = await make(clock=FakeClock(), jwks_url=jwks.url)
    assert (await authenticator.connection(signed(rsa_key, "RS256", "k1"))).user_id == "alice"
    assert jwks.requests == 1


async def test_jwks_key_rotation_needs_one_refetch(
        make: Make, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey,
        rsa_key2: rsa.RSAPrivateKey) -> None:
    """A kid that appears in the JWK set after start is accepted after exactly one refetch."""
    authenticator = await make(clock=FakeClock(), jwks_url=jwks.url)
    jwks.keys = [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]
    assert (await authenticator.connection(signed(rsa_key2, "RS256", "k2"))).user_id == "alice"
    assert jwks.requests == 2
    assert (await authenticator.connection(signed(rsa_key2, "RS256", "k2"))).user_id == "alice"
    assert jwks.requests == 2


async def test_unknown_kid_is_refused_after_one_refetch(
        make: Make, jwks: JwksServer, rsa_key2: rsa.RSAPrivateKey) -> None:
    """A kid the JWK set does not hold, even after one refetch: invalid, unknown key id."""
    authenticator = await make(clock=FakeClock(), jwks_url=jwks.url)
    error = await refusal(authenticator.connection(signed(rsa_key2, "RS256", "nope")))
    assert (error.reason, error.message) == ("invalid", "unknown key id")
    assert jwks.requests == 2


async def test_unknown_kid_refetches_at_most_once_a_second(
        make: Make, jwks: JwksServer, rsa_key2: rsa.RSAPrivateKey) -> None:
    """Unknown kids within JWKS_MIN_REFETCH of the last refetch cause no fetch; later, one."""
    clock = FakeClock()
    authenticator = await make(clock=clock, jwks_url=jwks.url)
    for _ in range(3):
        await refusal(authenticator.connection(signed(rsa_key2, "RS256", "nope")))
    assert jwks.requests == 2
    clock.advance(JWKS_MIN_REFETCH)
    await refusal(authenticator.connection(signed(rsa_key2, "RS256", "nope")))
    assert jwks.requests == 3


async def test_burst_of_unknown_kids_shares_one_fetch(
        make: Make, jwks: JwksServer, rsa_key2: rsa.RSAPrivateKey) -> None:
    """20 concurrent tokens with unknown kids wait for one and the same refetch."""
    authenticator = await make(clock=FakeClock(), jwks_url=jwks.url)
    tokens = [signed(rsa_key2, "RS256", f"new{n}") for n in range(20)]
    results = await asyncio.gather(*(authenticator.connection(t) for t in tokens),
                                   return_exceptions=True)
    assert all(isinstance(r, TokenError) and r.message == "unknown key id" for r in results)
    assert jwks.requests == 2


async def test_stale_jwks_is_fetched_again(
        make: Make, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    """A JWK set older than JWKS_TTL is fetched again before it is used."""
    clock = FakeClock()
    authenticator = await make(clock=clock, jwks_url=jwks.url)
    clock.advance(JWKS_TTL)
    assert (await authenticator.connection(signed(rsa_key, "RS256", "k1"))).user_id == "alice"
    assert jwks.requests == 2


async def test_jwks_down_at_start_is_unavailable(
        make: Make, rsa_key: rsa.RSAPrivateKey) -> None:
    """With the JWKS endpoint down, the node starts, and tokens are refused as unavailable
    (retry later), not as invalid."""
    server = JwksServer([])
    server.stop()  # Nothing listens on its port now.
    authenticator = await make(clock=FakeClock(), jwks_url=server.url)
    error = await refusal(authenticator.connection(signed(rsa_key, "RS256", "k1")))
    assert error.reason == "unavailable"


async def test_jwks_oct_key_is_never_an_hmac_secret(
        make: Make, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token is not verified with a symmetric key published in the JWK set."""
    jwks.keys = [jwk(rsa_key, "k1"), {"kty": "oct", "kid": "h1", "k": b64(SECRET.encode())}]
    authenticator = await make(clock=FakeClock(), jwks_url=jwks.url)
    token = jwt.encode(payload(), SECRET, algorithm="HS256", headers={"kid": "h1"})
    error = await refusal(authenticator.connection(token))
    assert error.message == "algorithm not allowed"


# --- roomcast token ---------------------------------------------------------------------------


def roomcast_token(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_JWT")}
    return subprocess.run([sys.executable, "-m", "roomcast", "token", *args],
                          capture_output=True, text=True, timeout=30, env=env, check=False)


def test_token_cli_actions_agree_with_the_service() -> None:
    """`roomcast token` grants the same four actions the node knows."""
    assert token_cli.ACTIONS == auth_module.ACTIONS


async def test_roomcast_token_mints_connection_and_room_tokens(make: Make) -> None:
    """`python -m roomcast token` prints a connection token (sub, rooms, exp - iat = ttl) and a
    room token that PyJWT and the Authenticator accept."""
    result = roomcast_token("--sub", "alice", "--room", "chat:*", "--actions", "join,publish",
                            "--ttl", "120", "--secret", SECRET)
    assert result.returncode == 0, result.stderr
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["rooms"] == {"chat:*": ["join", "publish"]}
    assert claims["exp"] - claims["iat"] == 120
    authenticator = await make(jwt_secret=SECRET)
    grants = (await authenticator.connection(token)).grants
    assert grants == (Grant("chat:*", frozenset({"join", "publish"})),)

    result = roomcast_token("--sub", "bob", "--room-token", "vip", "--secret", SECRET)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["room"], claims["actions"]) == ("bob", "vip", list(ACTIONS))
    assert claims["exp"] - claims["iat"] == 3600
    assert (await authenticator.room(token, "bob", "vip")).actions == frozenset(ACTIONS)


async def test_roomcast_token_signs_with_a_private_key(
        make: Make, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """--private-key with an EC key signs ES256 with the given kid, verified by the PEM."""
    (tmp_path / "key.pem").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "pub.pem").write_bytes(public_pem(ec_key))
    result = roomcast_token("--sub", "carol", "--private-key", str(tmp_path / "key.pem"),
                            "--kid", "e1", "--aud", "roomcast")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "e1", "typ": "JWT"}
    authenticator = await make(jwt_public_key=str(tmp_path / "pub.pem"), jwt_audience="roomcast")
    assert (await authenticator.connection(token)).user_id == "carol"


def test_roomcast_token_bad_input_is_one_line_and_exit_2() -> None:
    """No key, or --info that is not JSON: one line on stderr, exit code 2, nothing on stdout."""
    for args in (("--sub", "alice"), ("--sub", "alice", "--info", "{x", "--secret", SECRET)):
        result = roomcast_token(*args)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.startswith("roomcast token: ") and result.stderr.count("\n") == 1
