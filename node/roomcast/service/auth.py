"""Token verification: who a connection is and which rooms it may use, from a signed JWT.

Two kinds of token, never interchangeable (a ``room`` claim tells them apart):

* a *connection token* names the user (``sub``), optionally a display ``name``, a public ``info``
  value and ``rooms`` grants (room glob pattern -> actions);
* a *room token* grants one room (``room``) to one user (``sub``), for a room the connection token
  does not cover, with optional ``actions`` (all four when absent).

Keys: HMAC secrets (``--jwt-secret`` plus every line of ``--jwt-secret-file``) verify HS256/384/512
only; public keys (every PEM block of ``--jwt-public-key``, and the JWK set at ``--jwks-url``)
verify RS*, PS*, ES* and EdDSA only, so that a public key can never be used as an HMAC secret
(the HS/RS confusion attack). Several keys of a kind are valid at once (rotation); key files are
re-read when they change, the JWK set when a token names a key id it does not hold.

Fail closed (STYLE habit 18): every decode names its one algorithm, ``sub`` and ``exp`` are
required, ``exp``/``nbf``/``iat`` are checked with ``--jwt-leeway``, and anything unexpected is a
refusal. A refusal is a ``TokenError`` whose message is safe to show to the client.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import jwt
import orjson
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.types import Options

from roomcast.backends.broker import BrokerUnavailable
from roomcast.clock import Clock, monotonic
from roomcast.config import Config
from roomcast.protocol.envelopes import MAX_TOKEN_LENGTH, ErrorCode, ProtocolError, printable

log = structlog.get_logger("roomcast.auth")

#: What a grant may allow in a room.
ACTIONS: Final = ("join", "publish", "presence", "history")
#: Longest ``sub`` and ``name``: the protocol's identifier limit.
MAX_USER_LENGTH: Final = 64
#: Longest room pattern in a ``rooms`` claim (a pattern may be longer than a room name: globs).
MAX_PATTERN_LENGTH: Final = 128
#: Most entries in a ``rooms`` claim: a bound on the work every permission check does.
MAX_GRANTS: Final = 100
#: Largest ``info`` claim, as orjson encodes it: it is sent to every member of the user's rooms.
MAX_INFO_BYTES: Final = 1024
#: Shortest HMAC secret (RFC 7518 section 3.2: a key at least as long as the hash), as config.py.
MIN_SECRET_LENGTH: Final = 32
#: How often a key file's mtime is looked at: a rotation shows within a second, and a busy node
#: does not stat the file on every handshake.
FILE_CHECK_INTERVAL: Final = 1.0
#: A cached JWK set older than this is fetched again (an identity provider may drop a key).
JWKS_TTL: Final = 300.0
#: Fewest seconds between two fetches of the JWK set after start-up: tokens with made-up key ids
#: must not turn the node into a load generator against the identity provider.
JWKS_MIN_REFETCH: Final = 1.0
#: How long one JWKS request may take. Not a setting: the provider answers in milliseconds or is
#: down, and a handshake waiting on it should fail over to "unavailable" soon.
JWKS_TIMEOUT: Final = 5.0

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", *_EC_CURVES, "EdDSA"})

PublicKey = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
             | ed448.Ed448PublicKey)
_PUBLIC_KEY_TYPES: Final = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey,
                            ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
# RFC 7468 section 2: a label line, base64 lines, an end line with the same label.
_PEM_RE: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Grant:
    """Actions allowed on the rooms matching a glob pattern (fnmatch.fnmatchcase)."""

    pattern: str
    actions: frozenset[str]

    def allows(self, room: str, action: str) -> bool:
        """True when ``room`` matches the pattern (case-sensitive) and ``action`` is granted."""
        return action in self.actions and fnmatch.fnmatchcase(room, self.pattern)


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified connection token."""

    user_id: str  # sub
    name: str | None  # `name` claim, display name
    info: Any  # `info` claim: any JSON value (None when absent), public
    grants: tuple[Grant, ...]  # from the `rooms` claim
    expires_at: float  # exp, unix seconds


@dataclass(frozen=True, slots=True)
class RoomClaims:
    """A verified room token: grants one room to one user."""

    user_id: str
    room: str
    actions: frozenset[str]
    expires_at: float


class TokenError(Exception):
    """A token that was refused. reason: "invalid" (forged, malformed, wrong alg/aud/iss, missing
    claims, wrong kind), "expired" (exp passed, beyond the leeway), or "unavailable" (the keys
    could not be had: a JWKS endpoint down; the client should retry later). message: one line, safe
    to send to a client (what is wrong; never key material, never library exception text)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


#: A refusal's reason -> the error code the client is told (docs/PROTOCOL.md section 4).
ERROR_CODES: Final = {"invalid": ErrorCode.UNAUTHORIZED, "expired": ErrorCode.TOKEN_EXPIRED,
                      "unavailable": ErrorCode.UNAVAILABLE}


def request_error(exc: TokenError) -> ProtocolError | BrokerUnavailable:
    """What a request whose token was refused (a refresh, a room token) fails with: the
    backend's unavailability when the keys could not be had, else unauthorized or
    token_expired. The connection stays either way."""
    if exc.reason == "unavailable":
        return BrokerUnavailable(exc.message)
    return ProtocolError(ERROR_CODES[exc.reason], exc.message)


def _invalid(message: str) -> TokenError:
    return TokenError("invalid", message)


class Authenticator:
    """Verifies connection and room tokens against the configured keys.

    ``start`` loads the key files (ValueError naming the flag when one is unusable) and fetches
    the JWK set once; ``connection`` and ``room`` return verified claims or raise ``TokenError``.
    ``clock`` (monotonic seconds) paces the key-file checks and the JWKS cache; tests move it.
    """

    def __init__(self, config: Config, *, clock: Clock = monotonic) -> None:
        self._config = config
        self._secret_file = (KeyFile(config.jwt_secret_file, "--jwt-secret-file",
                                      parse_secrets, clock)
                             if config.jwt_secret_file else None)
        self._pem_file = (KeyFile(config.jwt_public_key, "--jwt-public-key", _parse_pem, clock)
                          if config.jwt_public_key else None)
        self._jwks = _Jwks(config.jwks_url, clock) if config.jwks_url else None
        require = ["sub", "exp"]
        if config.jwt_audience is not None:
            require.append("aud")
        if config.jwt_issuer is not None:
            require.append("iss")
        # sub is checked below (printable, length) rather than by PyJWT, for one message.
        self._options: Options = {"require": require,
                                  "verify_aud": config.jwt_audience is not None,
                                  "verify_sub": False}

    @property
    def enabled(self) -> bool:
        """True when clients are identified by tokens (``--auth jwt``)."""
        return self._config.auth == "jwt"

    async def start(self) -> None:
        """Load the secret and PEM files and fetch the JWK set once.

        Raises ValueError with a one-line message naming ``--jwt-secret-file`` or
        ``--jwt-public-key`` when that file is unreadable or malformed. A JWKS endpoint that
        cannot be reached only logs a warning: tokens are refused as "unavailable" until it can.
        """
        for key_file in (self._secret_file, self._pem_file):
            if key_file is not None:
                key_file.load()
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        """Stop a JWKS fetch under way. Idempotent."""
        if self._jwks is not None:
            await self._jwks.close()

    async def connection(self, token: str) -> Claims:
        """The verified claims of a connection token; TokenError when it is refused."""
        try:
            payload = await self._verified(token)
            if "room" in payload:
                raise _invalid("a room token is not a connection token")
            claims = Claims(
                user_id=_user(payload, "sub"),
                name=None if payload.get("name") is None else _user(payload, "name"),
                info=_info(payload.get("info")),
                grants=_grants(payload.get("rooms")),
                expires_at=_expiry(payload),
            )
        except TokenError as exc:
            log.debug("token refused", kind="connection", reason=exc.reason, why=exc.message)
            raise
        return claims

    async def room(self, token: str, user_id: str, room: str) -> RoomClaims:
        """The verified claims of a room token for ``user_id`` and ``room``; TokenError when it
        is refused, or is for another user or another room."""
        try:
            payload = await self._verified(token)
            if not isinstance(payload.get("room"), str):
                raise _invalid("not a room token")
            if _user(payload, "sub") != user_id:
                raise _invalid("room token is for another user")
            if payload["room"] != room:
                raise _invalid("room token is for another room")
            actions = payload.get("actions")
            claims = RoomClaims(
                user_id=user_id, room=room,
                actions=frozenset(ACTIONS) if actions is None else _actions(actions, "actions"),
                expires_at=_expiry(payload),
            )
        except TokenError as exc:
            log.debug("token refused", kind="room", reason=exc.reason, why=exc.message,
                      room=room)
            raise
        return claims

    # --- signature and registered claims ---------------------------------------------------

    async def _verified(self, token: str) -> dict[str, Any]:
        """The payload of ``token`` once a key of its algorithm verified it and PyJWT checked
        its registered claims (exp, nbf, iat, aud, iss)."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise _invalid("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str):  # Not even hashable, perhaps (a list).
            raise _invalid("algorithm not allowed")
        if alg in HMAC_ALGORITHMS:
            # HMAC tokens meet the secrets and nothing else: a public key (which anyone may
            # have) must never become an HMAC secret.
            secrets = self._secrets()
            if not secrets:
                raise _invalid("algorithm not allowed")
            payload = self._decode(token, alg, secrets)
        elif alg in PUBLIC_KEY_ALGORITHMS:
            if self._pem_file is None and self._jwks is None:
                raise _invalid("algorithm not allowed")
            pem = self._pem_file.current() if self._pem_file is not None else []
            payload = self._decode(token, alg, [k for k in pem if _fits(k, alg)])
            if payload is None and self._jwks is not None:
                keys = await self._jwks.keys(kid, alg)  # PyJWT checked: a str, or absent.
                payload = self._decode(token, alg, keys)
        else:
            raise _invalid("algorithm not allowed")
        if payload is None:
            raise _invalid("signature does not verify")
        return payload

    def _secrets(self) -> list[str]:
        secrets = [self._config.jwt_secret] if self._config.jwt_secret else []
        if self._secret_file is not None:
            secrets.extend(self._secret_file.current())
        return secrets

    def _decode(self, token: str, alg: str,
                keys: Sequence[str | PublicKey]) -> dict[str, Any] | None:
        """The payload from the first key that verifies the signature; None when none does.
        Claim errors (the signature held) are raised as TokenError at once."""
        config = self._config
        for key in keys:
            try:
                payload: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[alg], options=self._options,
                    audience=config.jwt_audience, issuer=config.jwt_issuer,
                    leeway=config.jwt_leeway)
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise TokenError("expired", "token expired") from None
            except jwt.ImmatureSignatureError:
                raise _invalid("token not valid yet") from None
            except jwt.InvalidAudienceError:
                raise _invalid("audience does not match") from None
            except jwt.InvalidIssuerError:
                raise _invalid("issuer does not match") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _invalid(f"missing claim {exc.claim}") from None
            except jwt.InvalidTokenError:
                raise _invalid("malformed token") from None
            except jwt.InvalidKeyError:
                # The key cannot serve this algorithm (say, a secret that looks like a PEM key,
                # which PyJWT refuses as an HMAC secret): another key may.
                continue
            return payload
        return None


# --- claim checks ---------------------------------------------------------------------------


def _user(payload: Mapping[str, Any], claim: str) -> str:
    """``payload[claim]`` when it is a printable string of 1 to 64 characters."""
    value = payload.get(claim)
    if isinstance(value, str) and 0 < len(value) <= MAX_USER_LENGTH and printable(value):
        return value
    raise _invalid(f"claim {claim} must be a printable string of 1 to {MAX_USER_LENGTH} "
                   "characters")


#: The latest ``exp`` taken: far beyond any real token (the year 2^53 seconds after 1970 is
#: further than the universe is old), and well inside what the envelopes can carry (orjson
#: encodes integers of at most 64 bits; an ``exp`` of 1e20 would crash the welcome).
MAX_EXP: Final = 2**53


def _expiry(payload: Mapping[str, Any]) -> float:
    # PyJWT checked exp against the clock but accepts anything int() takes (a numeric string).
    exp = payload["exp"]
    if (isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp)
            and exp <= MAX_EXP):
        return float(exp)
    raise _invalid("claim exp must be a number")


def _info(value: Any) -> Any:
    if value is None:
        return None
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # An integer beyond 64 bits, say: it could not be sent on.
        raise _invalid("claim info cannot be encoded") from None
    if size > MAX_INFO_BYTES:
        raise _invalid(f"claim info is longer than {MAX_INFO_BYTES} bytes")
    return value


def _actions(value: Any, claim: str) -> frozenset[str]:
    if isinstance(value, list) and all(isinstance(a, str) and a in ACTIONS for a in value):
        return frozenset(value)
    raise _invalid(f"claim {claim} must be a list of " + ", ".join(ACTIONS))


def _grants(value: Any) -> tuple[Grant, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_GRANTS:
        raise _invalid(f"claim rooms must be an object of at most {MAX_GRANTS} room patterns")
    grants = []
    for pattern, actions in value.items():
        if not (0 < len(pattern) <= MAX_PATTERN_LENGTH and printable(pattern)):
            raise _invalid(f"claim rooms: a room pattern must be a printable string of 1 to "
                           f"{MAX_PATTERN_LENGTH} characters")
        grants.append(Grant(pattern, _actions(actions, "rooms")))
    return tuple(grants)


def _fits(key: PublicKey, alg: str) -> bool:
    """True when ``key`` is of the type ``alg`` verifies with (RS/PS: RSA, ESnnn: the curve of
    that size, EdDSA: Ed25519 or Ed448)."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
    return alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


# --- key files ------------------------------------------------------------------------------


class KeyFile(Generic[K]):
    """The keys of one file, read again when its mtime (or size, or inode: a Kubernetes secret
    is swapped by a symlink) changes, looked at no more than once per FILE_CHECK_INTERVAL."""

    def __init__(self, path: str, flag: str, parse: Callable[[bytes, str, str], list[K]],
                 clock: Clock) -> None:
        self.path = path
        self.flag = flag
        self._parse = parse
        self._clock = clock
        self._keys: list[K] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -math.inf

    def load(self) -> None:
        """Read the file now. ValueError (one line, naming the flag) when it is unreadable or
        holds no usable key."""
        self._checked = self._clock()
        self._stamp, self._keys = self._read()

    def current(self) -> list[K]:
        """The keys, re-read first if the file changed. A file that became unreadable or
        unusable keeps the previous keys (one warning per change)."""
        now = self._clock()
        if now - self._checked < FILE_CHECK_INTERVAL:
            return self._keys
        self._checked = now
        try:
            stamp = _file_stamp(os.stat(self.path))
        except OSError as exc:
            if self._stamp is not None:  # Warn once, when it goes, not every second.
                log.warning("key file unreadable, keeping the previous keys", flag=self.flag,
                            path=self.path, error=exc.strerror)
            self._stamp = None
            return self._keys
        if stamp != self._stamp:
            try:
                self._stamp, self._keys = self._read()
                log.info("key file reloaded", flag=self.flag, path=self.path,
                         keys=len(self._keys))
            except ValueError as exc:
                self._stamp = stamp  # Read again only once it changes again.
                log.warning("key file unusable, keeping the previous keys", flag=self.flag,
                            path=self.path, error=str(exc))
        return self._keys

    def _read(self) -> tuple[tuple[int, int, int], list[K]]:
        try:
            with open(self.path, "rb") as handle:
                stamp = _file_stamp(os.fstat(handle.fileno()))
                data = handle.read()
        except OSError as exc:
            raise ValueError(f"{self.flag}: cannot read {self.path}: {exc.strerror}") from None
        return stamp, self._parse(data, self.flag, self.path)


def _file_stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def parse_secrets(data: bytes, flag: str, path: str) -> list[str]:
    """Every non-empty line (stripped), each at least MIN_SECRET_LENGTH characters."""
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {path} is not UTF-8 text") from None
    secrets = [line for line in lines if line]
    if not secrets:
        raise ValueError(f"{flag}: {path} is empty")
    for number, line in enumerate(lines, 1):
        if line and len(line) < MIN_SECRET_LENGTH:  # The line number, never the secret.
            raise ValueError(f"{flag}: {path} line {number}: a secret must be at least "
                             f"{MIN_SECRET_LENGTH} characters")
    return secrets


def _parse_pem(data: bytes, flag: str, path: str) -> list[PublicKey]:
    """The public key of every PEM block (PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE)."""
    blocks = list(_PEM_RE.finditer(data))
    if not blocks:
        raise ValueError(f"{flag}: {path} holds no PEM block")
    keys: list[PublicKey] = []
    for number, block in enumerate(blocks, 1):
        label = block.group(1).decode("ascii")
        try:
            key = (x509.load_pem_x509_certificate(block.group(0)).public_key()
                   if label == "CERTIFICATE" else serialization.load_pem_public_key(block.group(0)))
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError(f"{flag}: {path} PEM block {number} ({label}) is not a public "
                             "key") from None
        if not isinstance(key, _PUBLIC_KEY_TYPES):
            raise ValueError(f"{flag}: {path} PEM block {number} is not an RSA, EC or Ed25519 "
                             "public key")
        keys.append(key)
    return keys


# --- JWKS -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Jwk:
    kid: str | None
    alg: str | None  # As the JWK declares it (RFC 7517 section 4.4); None: any that fits.
    key: PublicKey


class _Jwks:
    """The identity provider's JWK set: fetched at start, cached for JWKS_TTL, fetched again
    for an unknown key id; one fetch at a time, shared by everyone waiting for it."""

    def __init__(self, url: str, clock: Clock) -> None:
        self.url = url
        # PyJWKClient only fetches (its own cache and cooldown are off): the cache, the TTL and
        # the refetch floor live here, on the injected clock.
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=JWKS_TIMEOUT)
        self._clock = clock
        self._keys: list[_Jwk] | None = None
        self._fetched_at = -math.inf
        self._last_refetch = -math.inf
        self._last_ok = False
        self._inflight: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The start-up fetch does not count towards the refetch floor.
        await self._join(self._start_fetch())

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # Not `await task`: our own cancellation must propagate.

    async def keys(self, kid: str | None, alg: str) -> list[PublicKey]:
        """The cached keys with id ``kid`` (every key when None) that fit ``alg``. A stale or
        missing set is fetched first, an unknown kid causes one more fetch (or joins one under
        way). TokenError: "invalid" for a kid still unknown, "unavailable" when the set could
        not be had."""
        if self._keys is None or self._clock() - self._fetched_at >= JWKS_TTL:
            await self._refetch()
        found = self._lookup(kid)
        if not found and kid is not None and self._keys is not None:
            # A key the provider added since the last fetch (rotation), or a made-up kid.
            await self._refetch()
            found = self._lookup(kid)
        if not found:
            if self._keys is None or not self._last_ok:
                raise TokenError("unavailable", "signing keys unavailable, try again later")
            raise _invalid("unknown key id")
        return [jwk.key for jwk in found if jwk.alg in (None, alg) and _fits(jwk.key, alg)]

    def _lookup(self, kid: str | None) -> list[_Jwk]:
        return [jwk for jwk in self._keys or () if kid is None or jwk.kid == kid]

    async def _refetch(self) -> None:
        """Join the fetch under way, or start one unless the last started < JWKS_MIN_REFETCH
        ago."""
        if self._inflight is None:
            now = self._clock()
            if now - self._last_refetch < JWKS_MIN_REFETCH:
                return
            self._last_refetch = now
            self._start_fetch()
        assert self._inflight is not None
        await self._join(self._inflight)

    def _start_fetch(self) -> asyncio.Task[None]:
        self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
        return self._inflight

    async def _join(self, task: asyncio.Task[None]) -> None:
        # A waiter that is cancelled (its client went away) leaves the fetch running for the
        # others.
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        try:
            # urllib blocks: in a thread, never on the event loop.
            data = await asyncio.to_thread(self._client.fetch_data)
            keys = _parse_jwks(data)
        except (jwt.PyJWTError, OSError, ValueError) as exc:
            self._last_ok = False
            log.warning("JWKS fetch failed", url=self.url, error=str(exc),
                        cached_keys=len(self._keys or ()))
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self._last_ok = True
            log.debug("JWKS fetched", url=self.url, keys=len(keys))
        finally:
            if self._inflight is asyncio.current_task():
                self._inflight = None


def _parse_jwks(data: Any) -> list[_Jwk]:
    """The usable signing keys of a JWK set document. PyJWKSet checks the document (a list with
    at least one usable key, else PyJWKSetError); each key is then read with PyJWK, as PyJWKSet
    does, to keep the ``alg`` and ``use`` the JWK declares."""
    jwt.PyJWKSet.from_dict(data)
    keys = []
    for entry in data["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry).key
        except jwt.PyJWTError:
            continue  # An unusable key (an unknown kty or curve) is skipped, as PyJWKSet does.
        kid, alg = entry.get("kid"), entry.get("alg")
        if isinstance(key, _PUBLIC_KEY_TYPES):  # Not oct (HMAC) keys, not private keys.
            keys.append(_Jwk(kid if isinstance(kid, str) else None,
                             alg if isinstance(alg, str) else None, key))
    if not keys:
        raise jwt.PyJWKSetError("the JWK set holds no public signing key")
    return keys
