"""``roomcast token``: mint a signed connection or room token (JWT) for testing.

A connection token names the user (``sub``) and, with ``--room``, the rooms it may use; a room
token (``--room-token``) grants one room to one user. Both are what ``roomcast node --auth jwt``
verifies (service/auth.py): signed with an HMAC secret (``--secret``, ``--secret-file``, or the
node's own ``ROOMCAST_JWT_SECRET`` / ``ROOMCAST_JWT_SECRET_FILE``) or with a private key
(``--private-key``) whose public half the node has in ``--jwt-public-key`` or its JWKS.

The token and a newline go to stdout, so that ``TOKEN=$(roomcast token --sub alice ...)`` works.
Exit codes: 0 printed, 2 bad usage (a one-line error on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from roomcast.config import read_secret_file

#: The actions a token may grant: the same as roomcast.service.auth.ACTIONS (tools do not import
#: the service; tests/unit/test_auth.py checks the two agree).
ACTIONS: Final = ("join", "publish", "presence", "history")
#: As the node requires of an HMAC secret (config.py: RFC 7518 section 3.2).
MIN_SECRET_LENGTH: Final = 32
DEFAULT_TTL: Final = 3600
HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
_EC_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``token`` to the ``roomcast`` subparsers."""
    token = sub.add_parser(
        "token", help="mint a signed connection or room token (JWT) for testing",
        description="Print a signed JWT for a node running with --auth jwt: a connection token "
        "(sub, optional name, info and rooms grants) or, with --room-token, a room token (sub, "
        "room, actions). Sign with an HMAC secret (--secret, --secret-file, else the environment "
        "variables ROOMCAST_JWT_SECRET or ROOMCAST_JWT_SECRET_FILE) or with --private-key.",
    )
    token.add_argument("--sub", required=True, help="the user id (sub claim)")
    token.add_argument("--name", help="display name (name claim; connection tokens only)")
    token.add_argument("--info", metavar="JSON",
                       help="public user info, any JSON value (info claim; connection tokens "
                       "only)")
    kind = token.add_mutually_exclusive_group()
    kind.add_argument("--room", action="append", default=[], metavar="PATTERN",
                      help="grant --actions on the rooms matching this glob pattern (rooms "
                      "claim), repeatable, e.g. --room 'chat:*'")
    kind.add_argument("--room-token", metavar="ROOM",
                      help="mint a room token for ROOM instead of a connection token")
    token.add_argument("--actions", type=_actions, default=ACTIONS, metavar="LIST",
                       help="comma-separated actions for --room or --room-token, from "
                       f"{','.join(ACTIONS)} (default: all four)")
    token.add_argument("--ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                       help=f"seconds the token is valid: exp = now + ttl (default: "
                       f"{DEFAULT_TTL}; negative: an already expired token)")
    token.add_argument("--aud", help="audience (aud claim), as the node's --jwt-audience")
    token.add_argument("--iss", help="issuer (iss claim), as the node's --jwt-issuer")
    token.add_argument("--kid", help="key id (kid header), as a JWKS names the key")
    key = token.add_mutually_exclusive_group()
    key.add_argument("--secret", help="HMAC secret, at least 32 characters")
    key.add_argument("--secret-file", metavar="FILE",
                     help="file whose first line is the HMAC secret")
    key.add_argument("--private-key", metavar="PEM",
                     help="PEM file of an unencrypted RSA, EC or Ed25519 private key")
    token.add_argument("--alg", help="signing algorithm (default: HS256 with a secret, RS256 "
                       "for an RSA key, ES256/ES384/ES512 for an EC key by its curve, EdDSA for "
                       "Ed25519)")
    token.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the token; a one-line error on stderr and 2 on bad input."""
    try:
        token = mint(args, os.environ, now=int(time.time()))
    except UsageError as exc:
        print(f"roomcast token: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(token + "\n")
    return 0


def mint(args: argparse.Namespace, environ: Mapping[str, str], now: int) -> str:
    """The signed token ``args`` describe, issued at ``now`` (unix seconds)."""
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if args.room_token is not None:
        if args.name is not None or args.info is not None:
            raise UsageError("--name and --info belong in a connection token, not --room-token")
        claims["room"] = args.room_token
        claims["actions"] = list(args.actions)
    else:
        if args.name is not None:
            claims["name"] = args.name
        if args.info is not None:
            try:
                claims["info"] = orjson.loads(args.info)
            except orjson.JSONDecodeError:
                raise UsageError(f"--info: not a JSON value: {args.info!r}") from None
        if args.room:
            claims["rooms"] = {pattern: list(args.actions) for pattern in args.room}
    if args.aud is not None:
        claims["aud"] = args.aud
    if args.iss is not None:
        claims["iss"] = args.iss
    key, alg = _signing_key(args, environ)
    headers = {"kid": args.kid} if args.kid is not None else None
    try:
        return jwt.encode(claims, key, algorithm=alg, headers=headers)
    except jwt.InvalidKeyError:
        raise UsageError(f"--alg {alg} cannot be used with this key") from None


def _signing_key(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Any, str]:
    """The key and the algorithm to sign with."""
    if args.private_key is not None:
        key = _private_key(args.private_key)
        default = _default_alg(key)
        alg = args.alg or default
        if not _fits(alg, default):
            raise UsageError(f"--alg {alg} does not suit this key (it signs {_family(default)})")
        return key, alg
    secret = _secret(args, environ)
    alg = args.alg or "HS256"
    if alg not in HMAC_ALGORITHMS:
        raise UsageError(f"--alg {alg} needs --private-key; a secret signs "
                         + ", ".join(HMAC_ALGORITHMS))
    return secret, alg


def _secret(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    try:
        if args.secret is not None:
            secret: str = args.secret
        elif args.secret_file is not None:
            secret = read_secret_file(args.secret_file, "--secret-file")
        elif environ.get("ROOMCAST_JWT_SECRET"):
            secret = environ["ROOMCAST_JWT_SECRET"]
        elif environ.get("ROOMCAST_JWT_SECRET_FILE"):
            secret = read_secret_file(environ["ROOMCAST_JWT_SECRET_FILE"],
                                      "ROOMCAST_JWT_SECRET_FILE")
        else:
            raise UsageError("no key: give --secret, --secret-file or --private-key (or set "
                             "ROOMCAST_JWT_SECRET or ROOMCAST_JWT_SECRET_FILE)")
    except ValueError as exc:  # read_secret_file's one-line message, naming the flag.
        raise UsageError(str(exc)) from None
    if len(secret) < MIN_SECRET_LENGTH:
        raise UsageError(f"the secret must be at least {MIN_SECRET_LENGTH} characters (the "
                         "node refuses shorter ones)")
    return secret


def _private_key(path: str) -> Any:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise UsageError(f"--private-key: cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted".
        raise UsageError(f"--private-key: {path} is encrypted; give an unencrypted key") from None
    except ValueError:
        raise UsageError(f"--private-key: {path} is not a PEM private key") from None
    return key


def _default_alg(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGORITHMS:
        return _EC_ALGORITHMS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return "EdDSA"
    raise UsageError("--private-key: not an RSA, EC (P-256, P-384, P-521) or Ed25519 key")


def _family(default: str) -> str:
    return {"RS256": "RS256/384/512 and PS256/384/512", "EdDSA": "EdDSA"}.get(default, default)


def _fits(alg: str, default: str) -> bool:
    if default == "RS256":
        return alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    return alg == default  # An EC key signs the one ES algorithm of its curve; EdDSA is one.


def _actions(text: str) -> tuple[str, ...]:
    actions = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [a for a in actions if a not in ACTIONS]
    if unknown or not actions:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(ACTIONS)}; got {text!r}")
    return actions
