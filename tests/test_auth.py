"""JWT identity against real node processes: tokens in the URL, a header or the connect frame;
HS256, RS256 and JWKS keys; refusals at the handshake (HTTP 401) and in the connect frame
(error, then 4501/4502); the chat dialects; expiry, refresh and 4002; key-file rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from tests.fakes import JwksServer
from tests.harness import Client, NodeProcess, barrier

SECRET = "s" * 32
OTHER_SECRET = "t" * 32
AUDIENCE = "roomcast-tests"
ISSUER = "https://issuer.test"
#: Flags every node of this module gets: no rate limit in the way, a short presence grace.
BASE_FLAGS = ("--rate-burst", "500", "--presence-grace", "0.3")
#: RFC 6750 section 3: every 401 names the scheme and realm.
CHALLENGE = 'Bearer realm="roomcast"'

StartNode = Callable[..., NodeProcess]


# --- tokens ---------------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid connection-token payload for alice ("Alice"), a minute to live; ``overrides``
    added (None removes a claim)."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "name": "Alice", "iat": now, "exp": now + 60}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def rs256(key: rsa.RSAPrivateKey, kid: str | None = None, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm="RS256",
                      headers={"kid": kid} if kid else None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand: HMAC-SHA256 with ``key`` (PyJWT refuses a PEM key as an HMAC
    secret, which is the point of the HS/RS confusion attack), or no signature (``None``)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if key is None:
        return f"{signing_input}."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- nodes and clients ----------------------------------------------------------------------


def jwt_node(start_node: StartNode, *flags: str) -> NodeProcess:
    """A node with --auth jwt and the HMAC secret SECRET."""
    return start_node(None, "--auth", "jwt", "--jwt-secret", SECRET, *BASE_FLAGS, *flags)


@dataclass(frozen=True)
class Deployment:
    """A node and how to mint a token it accepts (``good(**overrides)``)."""

    node: NodeProcess
    good: Callable[..., str]
    pem: bytes = b""


def deploy(kind: str, start_node: StartNode, tmp_path: Path,
           rsa_key: rsa.RSAPrivateKey) -> Deployment:
    """hs: --jwt-secret only; rs: --jwt-public-key only; claims: --jwt-secret with
    --jwt-audience and --jwt-issuer."""
    if kind == "hs":
        return Deployment(jwt_node(start_node), hs256)
    if kind == "rs":
        pem = public_pem(rsa_key)
        (tmp_path / "public.pem").write_bytes(pem)
        node = start_node(None, "--auth", "jwt", "--jwt-public-key",
                          str(tmp_path / "public.pem"), *BASE_FLAGS)
        return Deployment(node, lambda **c: rs256(rsa_key, **c), pem)
    assert kind == "claims"
    node = jwt_node(start_node, "--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER)
    return Deployment(node, lambda **c: hs256(**{"aud": AUDIENCE, "iss": ISSUER, **c}))


async def connected(node: NodeProcess, token: str, room: str | None = None,
                    path: str = "/ws") -> Client:
    """A native client with ``token`` in the URL that has read its welcome (and joined
    ``room``)."""
    client = await Client.open(node.ws(f"{path}?token={token}"))
    await client.expect("welcome")
    if room is not None:
        joined = await client.request({"type": "join", "room": room, "id": "join"})
        assert joined["type"] == "joined", joined
    return client


async def refused_handshake(url: str, **kwargs: Any) -> Response:
    """The HTTP answer to an upgrade request the node refused."""
    with pytest.raises(InvalidStatus) as caught:
        await Client.open(url, **kwargs)
    return caught.value.response


async def refused_session(client: Client) -> tuple[list[dict[str, Any]], int | None]:
    """Everything the node sent up to its close, and the close code."""
    messages = await client.until_closed(timeout=5)
    return messages, await client.closed(timeout=5)


def assert_invalid_token(response: Response, why: str) -> None:
    """A 401 whose challenge says invalid_token and why (RFC 6750 section 3)."""
    assert response.status_code == 401, response
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith(CHALLENGE), challenge
    assert 'error="invalid_token"' in challenge, challenge
    assert why in challenge, challenge


# --- identity from the token (native /ws) -----------------------------------------------------


async def test_token_in_query_string_names_the_connection(start_node: StartNode) -> None:
    """?token=: welcome with user_id = sub, username = name claim, expires_at = exp."""
    node = jwt_node(start_node)
    exp = int(time.time()) + 120
    client = await Client.open(node.ws(f"/ws?token={hs256(exp=exp)}"))
    welcome = await client.expect("welcome")
    assert (welcome["user_id"], welcome["username"], welcome["expires_at"]) == (
        "alice", "Alice", exp)
    assert "anonymous" not in welcome


async def test_token_in_authorization_header_names_the_connection(
        start_node: StartNode) -> None:
    """Authorization: Bearer: welcome with user_id = sub, username = name claim."""
    node = jwt_node(start_node)
    exp = int(time.time()) + 120
    client = await Client.open(
        node.ws("/ws"), additional_headers={"Authorization": f"Bearer {hs256(exp=exp)}"})
    welcome = await client.expect("welcome")
    assert (welcome["user_id"], welcome["username"], welcome["expires_at"]) == (
        "alice", "Alice", exp)


async def test_connect_frame_names_the_connection(start_node: StartNode) -> None:
    """No token at the handshake: the connect frame's token gives a welcome carrying its id."""
    node = jwt_node(start_node)
    exp = int(time.time()) + 120
    client = await Client.open(node.ws("/ws"))
    await client.send({"type": "connect", "token": hs256(exp=exp), "id": 1})
    welcome = await client.expect("welcome")
    assert welcome["id"] == 1
    assert (welcome["user_id"], welcome["username"], welcome["expires_at"]) == (
        "alice", "Alice", exp)


async def test_username_defaults_to_sub_without_name_claim(start_node: StartNode) -> None:
    """A token without a name claim: username is the sub, in welcome and in messages."""
    node = jwt_node(start_node)
    client = await connected(node, hs256(sub="bob", name=None), room="r")
    assert client.seen[0]["username"] == "bob"
    await client.send({"type": "publish", "room": "r", "data": "hi"})
    assert (await client.expect("message"))["from"] == {"user_id": "bob", "username": "bob"}


@pytest.mark.parametrize("via", ["query-token", "connect-frame"])
async def test_query_identity_is_ignored_under_jwt(start_node: StartNode, via: str) -> None:
    """?user_id=mallory&username=x is ignored under jwt: welcome, message `from` and presence
    show the token's alice, whether the token came in the URL or the connect frame."""
    node = jwt_node(start_node)
    query = "user_id=mallory&username=x"
    bob = await connected(node, hs256(sub="bob", name="Bob"), room="r")
    if via == "query-token":
        alice = await Client.open(node.ws(f"/ws?token={hs256()}&{query}"))
    else:
        alice = await Client.open(node.ws(f"/ws?{query}"))
        await alice.send({"type": "connect", "token": hs256(), "id": 1})
    welcome = await alice.expect("welcome")
    assert (welcome["user_id"], welcome["username"]) == ("alice", "Alice")
    assert (await alice.request({"type": "join", "room": "r", "id": 2}))["type"] == "joined"
    await alice.request({"type": "publish", "room": "r", "data": "hello", "id": 3})
    for client in (alice, bob):
        message = await client.expect("message")
        assert message["data"] == "hello"
        assert message["from"] == {"user_id": "alice", "username": "Alice"}
    presence = await bob.request({"type": "presence", "room": "r", "id": 4})
    assert sorted((m["user_id"], m["username"]) for m in presence["members"]) == [
        ("alice", "Alice"), ("bob", "Bob")]


# --- the three kinds of key -----------------------------------------------------------------


async def test_hs256_token_connects(start_node: StartNode) -> None:
    """An HS256 token signed with --jwt-secret connects as its sub."""
    node = jwt_node(start_node)
    client = await connected(node, hs256(sub="hs-user"))
    assert client.seen[0]["user_id"] == "hs-user"


async def test_rs256_token_connects_with_pem_public_key(
        start_node: StartNode, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token verifies with the RSA public key of --jwt-public-key (a PEM file)."""
    deployment = deploy("rs", start_node, tmp_path, rsa_key)
    client = await connected(deployment.node, rs256(rsa_key, sub="rs-user"))
    assert client.seen[0]["user_id"] == "rs-user"


@pytest.fixture
def jwks(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    key = {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "k1",
           "alg": "RS256", "use": "sig"}
    server = JwksServer([key])
    yield server
    server.stop()


async def test_jwks_token_connects(
        start_node: StartNode, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token whose kid is in the --jwks-url key set connects as its sub."""
    node = start_node(None, "--auth", "jwt", "--jwks-url", jwks.url, *BASE_FLAGS)
    client = await connected(node, rs256(rsa_key, kid="k1", sub="jwks-user"))
    assert client.seen[0]["user_id"] == "jwks-user"
    assert jwks.requests >= 1


# --- refusals: the handshake (HTTP 401) and the connect frame (error, then a close) ------------


@dataclass(frozen=True)
class Refusal:
    """A token a node refuses: which node (``deploy`` kind), the token, a word of the reason,
    and the error code and close code of the connect-frame path."""

    kind: str
    token: Callable[[Deployment], str]
    why: str
    code: str = "unauthorized"
    close: int = 4501


REFUSALS = {
    "expired": Refusal("hs", lambda d: d.good(exp=int(time.time()) - 60), "expired",
                       "token_expired", 4502),
    "not-yet-valid": Refusal("hs", lambda d: d.good(nbf=int(time.time()) + 60), "not valid yet"),
    "wrong-signature": Refusal("hs", lambda d: hs256(OTHER_SECRET), "signature"),
    "alg-none": Refusal("hs", lambda d: hand_signed({"alg": "none", "typ": "JWT"}, claims(),
                                                    None), "algorithm"),
    "hs-rs-confusion": Refusal("rs", lambda d: hand_signed({"alg": "HS256", "typ": "JWT"},
                                                           claims(), d.pem), "algorithm"),
    "wrong-audience": Refusal("claims", lambda d: d.good(aud="someone-else"), "audience"),
    "wrong-issuer": Refusal("claims", lambda d: d.good(iss="https://evil.test"), "issuer"),
    "missing-sub": Refusal("hs", lambda d: d.good(sub=None), "sub"),
    "room-token": Refusal("hs", lambda d: d.good(room="r"), "room token"),
}


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize("case", REFUSALS)
async def test_bad_token_at_handshake_is_refused_with_401(
        start_node: StartNode, tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
        case: str, where: str) -> None:
    """A bad token in ?token= or Authorization: Bearer: HTTP 401 with an invalid_token
    challenge saying why; a connected client still gets its publish round-trip."""
    refusal = REFUSALS[case]
    deployment = deploy(refusal.kind, start_node, tmp_path, rsa_key)
    node = deployment.node
    witness = await connected(node, deployment.good(sub="witness"), room="w")
    token = refusal.token(deployment)
    if where == "query":
        response = await refused_handshake(node.ws(f"/ws?token={token}"))
    else:
        response = await refused_handshake(
            node.ws("/ws"), additional_headers={"Authorization": f"Bearer {token}"})
    assert_invalid_token(response, refusal.why)
    await barrier(witness, "w", witness)


@pytest.mark.parametrize("case", REFUSALS)
async def test_bad_token_in_connect_frame_gets_error_then_close(
        start_node: StartNode, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, case: str) -> None:
    """A bad token in the connect frame: one error (unauthorized, token_expired when expired)
    with the frame's id, then close 4501 (4502 when expired); others are still served."""
    refusal = REFUSALS[case]
    deployment = deploy(refusal.kind, start_node, tmp_path, rsa_key)
    node = deployment.node
    witness = await connected(node, deployment.good(sub="witness"), room="w")
    client = await Client.open(node.ws("/ws"))
    await client.send({"type": "connect", "token": refusal.token(deployment), "id": 1})
    messages, code = await refused_session(client)
    assert [(m["type"], m["code"], m["id"]) for m in messages] == [("error", refusal.code, 1)]
    assert refusal.why in messages[0]["message"]
    assert code == refusal.close
    await barrier(witness, "w", witness)


async def test_no_connect_frame_within_auth_timeout_closes_4501(start_node: StartNode) -> None:
    """No token at the handshake and no frame within --auth-timeout: error, then close 4501."""
    node = jwt_node(start_node, "--auth-timeout", "0.5")
    witness = await connected(node, hs256(sub="witness"), room="w")
    client = await Client.open(node.ws("/ws"))
    started = time.monotonic()
    messages, code = await refused_session(client)
    assert time.monotonic() - started >= 0.4
    assert [(m["type"], m["code"]) for m in messages] == [("error", "unauthorized")]
    assert code == 4501
    await barrier(witness, "w", witness)


async def test_first_frame_other_than_connect_closes_4501(start_node: StartNode) -> None:
    """A first frame that is not connect (a join): error unauthorized with its id, close 4501,
    and the join was not served."""
    node = jwt_node(start_node, "--auth-timeout", "0.5")
    witness = await connected(node, hs256(sub="witness"), room="w")
    client = await Client.open(node.ws("/ws"))
    await client.send({"type": "join", "room": "w", "id": 5})
    messages, code = await refused_session(client)
    assert [(m["type"], m["code"], m["id"]) for m in messages] == [("error", "unauthorized", 5)]
    assert code == 4501
    presence = await witness.request({"type": "presence", "room": "w", "id": "p"})
    assert [m["user_id"] for m in presence["members"]] == ["witness"]
    await barrier(witness, "w", witness)


async def test_connect_frame_without_token_closes_4501(start_node: StartNode) -> None:
    """A connect frame without a token (no --allow-anonymous): error unauthorized, close 4501."""
    node = jwt_node(start_node)
    witness = await connected(node, hs256(sub="witness"), room="w")
    client = await Client.open(node.ws("/ws"))
    await client.send({"type": "connect", "id": 1})
    messages, code = await refused_session(client)
    assert [(m["type"], m["code"], m["id"]) for m in messages] == [("error", "unauthorized", 1)]
    assert code == 4501
    await barrier(witness, "w", witness)


async def test_allow_anonymous_welcomes_connect_without_token(start_node: StartNode) -> None:
    """--allow-anonymous: a connect frame without a token gets a welcome with anonymous: true
    and an anon- user id."""
    node = jwt_node(start_node, "--allow-anonymous", "true")
    client = await Client.open(node.ws("/ws?user_id=mallory"))
    await client.send({"type": "connect", "id": 1})
    welcome = await client.expect("welcome")
    assert welcome["id"] == 1 and welcome["anonymous"] is True
    assert welcome["user_id"].startswith("anon-") and "expires_at" not in welcome


# --- the chat dialects ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/chat/lobby", "/"], ids=["fastapi", "tutorial"])
async def test_chat_dialect_without_token_is_refused_with_401(
        start_node: StartNode, path: str) -> None:
    """The FastAPI and tutorial dialects under jwt without a token: HTTP 401 with a Bearer
    challenge (no connect frame there); a connected client is still served."""
    node = jwt_node(start_node)
    witness = await connected(node, hs256(sub="witness"), room="w")
    response = await refused_handshake(node.ws(f"{path}?user_id=alice&username=Alice"))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith(CHALLENGE)
    await barrier(witness, "w", witness)


async def test_fastapi_identity_comes_from_token(start_node: StartNode) -> None:
    """FastAPI dialect with ?token=: user_joined and messages show the token's sub and name,
    not the user_id/username of the query."""
    node = jwt_node(start_node)
    client = await Client.open(
        node.ws(f"/ws/chat/lobby?token={hs256()}&user_id=mallory&username=Mallory"))
    joined = await client.expect("user_joined")
    assert (joined["user_id"], joined["username"], joined["room_id"]) == (
        "alice", "Alice", "lobby")
    assert (await client.expect("room_members"))["members"] == ["alice"]
    await client.send({"type": "message", "content": "hi"})
    message = await client.expect("message")
    assert (message["user_id"], message["username"], message["content"]) == (
        "alice", "Alice", "hi")


async def test_tutorial_identity_and_nick_come_from_token(start_node: StartNode) -> None:
    """Tutorial dialect with ?token=: the nick is the token's name, whatever the client asks
    for (its clients show only nicks: asking for "Bob" must not make mallory look like Bob);
    presence shows the token's sub as the user id."""
    node = jwt_node(start_node)
    bob = await connected(node, hs256(sub="bob", name="Bob"), room="chat")
    mallory = await Client.open(node.ws(f"/?token={hs256(sub='mallory', name='Mal')}"))
    await mallory.send({"type": "join", "nick": "Bob"})
    assert (await mallory.expect("info"))["text"].startswith("Welcome, Mal!")
    await mallory.send({"type": "chat", "nick": "ignored", "text": "hello"})
    assert await mallory.expect("chat") == {"type": "chat", "nick": "Mal", "text": "hello"}
    message = await bob.expect("message")
    assert message["from"] == {"user_id": "mallory", "username": "Mal"}
    presence = await bob.request({"type": "presence", "room": "chat", "id": "p"})
    assert sorted((m["user_id"], m["username"]) for m in presence["members"]) == [
        ("bob", "Bob"), ("mallory", "Mal")]


# --- expiry and refresh ---------------------------------------------------------------------


def expiring_node(start_node: StartNode) -> NodeProcess:
    """No leeway, one second of grace after exp."""
    return jwt_node(start_node, "--jwt-leeway", "0", "--refresh-grace", "1")


async def test_refresh_in_time_keeps_connection_open(start_node: StartNode) -> None:
    """refresh_required (grace_ms) at exp; a refresh within the grace gets refreshed with the
    new expires_at and the connection outlives the old grace (it lasts to the new exp)."""
    node = expiring_node(start_node)
    old_exp = int(time.time()) + 2
    client = await connected(node, hs256(exp=old_exp), room="r")
    assert client.seen[0]["expires_at"] == old_exp
    required = await client.expect("refresh_required", timeout=5)
    assert required["grace_ms"] == 1000
    assert time.time() >= old_exp - 0.1
    new_exp = old_exp + 2  # Still valid now, and after the old grace (old_exp + 1) ends.
    reply = await client.request({"type": "refresh", "token": hs256(exp=new_exp), "id": "r"})
    assert reply == {"type": "refreshed", "expires_at": new_exp, "id": "r"}
    # Barrier: the next refresh_required comes at the new exp, after the old grace ended; a
    # 4002 close at the old deadline would have ended the connection before it.
    await client.expect("refresh_required", timeout=5)
    assert time.time() > old_exp + 1
    ack = await barrier(client, "r", client)
    assert ack["offset"] == 1


async def test_no_refresh_within_grace_closes_4002(start_node: StartNode) -> None:
    """No refresh within --refresh-grace after refresh_required: close 4002."""
    node = expiring_node(start_node)
    client = await connected(node, hs256(exp=int(time.time()) + 2))
    assert (await client.expect("refresh_required", timeout=5))["grace_ms"] == 1000
    warned = time.monotonic()
    messages, code = await refused_session(client)
    assert messages == []
    assert code == 4002
    assert time.monotonic() - warned >= 0.8


async def test_refresh_for_another_user_is_refused_connection_stays(
        start_node: StartNode) -> None:
    """A refresh whose token names another sub: error unauthorized; the connection stays and
    keeps its identity."""
    node = jwt_node(start_node)
    client = await connected(node, hs256(), room="r")
    reply = await client.request({"type": "refresh", "token": hs256(sub="bob"), "id": "r"})
    assert (reply["type"], reply["code"]) == ("error", "unauthorized")
    await barrier(client, "r", client)
    marker = [m for m in client.seen if m["type"] == "message"][-1]
    assert marker["from"] == {"user_id": "alice", "username": "Alice"}


async def test_refresh_with_expired_token_is_refused(start_node: StartNode) -> None:
    """A refresh with an expired token: error token_expired; the connection stays."""
    node = jwt_node(start_node)
    client = await connected(node, hs256(), room="r")
    expired = hs256(exp=int(time.time()) - 60)
    reply = await client.request({"type": "refresh", "token": expired, "id": "r"})
    assert (reply["type"], reply["code"]) == ("error", "token_expired")
    await barrier(client, "r", client)


# --- the default, and key rotation ------------------------------------------------------------


def unverified_warnings(node: NodeProcess) -> list[dict[str, Any]]:
    return [line for line in node.lines
            if line.get("level") == "warning" and "not verified" in str(line.get("event"))]


async def test_auth_none_warns_identities_are_unverified(start_node: StartNode) -> None:
    """--auth none (the default) logs one WARNING at start that identities are not verified;
    --auth jwt does not."""
    node = start_node(None, *BASE_FLAGS)
    assert len(unverified_warnings(node)) == 1, node.output()[-2000:]
    assert unverified_warnings(jwt_node(start_node)) == []


async def test_secret_appended_to_secret_file_is_accepted_without_restart(
        start_node: StartNode, tmp_path: Path) -> None:
    """--jwt-secret-file: a secret appended to the file verifies tokens within a few seconds;
    the connection made with the first secret stays open, and that secret still verifies."""
    secrets = tmp_path / "secrets"
    secrets.write_text(f"{SECRET}\n")
    node = start_node(None, "--auth", "jwt", "--jwt-secret-file", str(secrets), *BASE_FLAGS)
    first = await connected(node, hs256(SECRET), room="r")
    new_token = hs256(OTHER_SECRET, sub="bob")
    assert_invalid_token(await refused_handshake(node.ws(f"/ws?token={new_token}")),
                         "signature")
    with secrets.open("a") as handle:
        handle.write(f"{OTHER_SECRET}\n")
    deadline = time.monotonic() + 3.5
    while True:  # The file is looked at once per second: retry, bounded.
        try:
            second = await connected(node, new_token)
            break
        except InvalidStatus as exc:
            assert exc.response.status_code == 401
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert second.seen[0]["user_id"] == "bob"
    await barrier(first, "r", first)
    assert (await connected(node, hs256(SECRET, sub="carol"))).seen[0]["user_id"] == "carol"


# --- rights that change, and hostile claims ---------------------------------------------------


def vip_node(start_node: StartNode, tmp_path: Path, *flags: str) -> NodeProcess:
    """A jwt node with a namespace only grants admit to (vip) and an open one (pub)."""
    spaces = tmp_path / "namespaces.toml"
    spaces.write_text('[namespaces.vip]\njoin = "granted"\n[namespaces.pub]\njoin = "anyone"\n')
    return jwt_node(start_node, "--namespaces-file", str(spaces), *flags)


async def test_refresh_with_fewer_grants_leaves_the_rooms_no_longer_allowed(
        start_node: StartNode, tmp_path: Path) -> None:
    """A refresh whose token no longer grants a joined room takes the connection out of it
    (left, reason forbidden, before refreshed): no message of the room reaches it after."""
    node = vip_node(start_node, tmp_path)
    alice = await connected(node, hs256(rooms={"vip:*": ["join"]}), room="vip:gold")
    assert (await alice.request({"type": "join", "room": "pub:hall", "id": "j2"}))["type"] \
        == "joined"
    bob = await connected(node, hs256(sub="bob", rooms={"vip:*": ["join", "publish"]}),
                          room="vip:gold")
    await alice.expect("user_joined")  # bob's, in vip:gold
    await alice.send({"type": "refresh", "token": hs256(), "id": "r"})
    assert await alice.recv() == {"type": "left", "room": "vip:gold", "reason": "forbidden"}
    assert (await alice.recv())["type"] == "refreshed"
    await bob.request({"type": "publish", "room": "vip:gold", "data": "secret", "id": "p"})
    # A barrier in the room alice is still in: nothing of vip:gold came before it.
    await barrier(bob, "pub:hall", alice)
    assert not [m for m in alice.seen if m.get("room") == "vip:gold" and m["type"] == "message"]


async def test_a_room_token_grants_nothing_after_its_exp(
        start_node: StartNode, tmp_path: Path) -> None:
    """A room token's grant ends at its exp: a rejoin without a token is then forbidden and the
    room's history is not readable."""
    node = vip_node(start_node, tmp_path, "--jwt-leeway", "0")
    alice = await connected(node, hs256())
    exp = int(time.time()) + 2
    room_token = jwt.encode({"sub": "alice", "room": "vip:gold", "exp": exp}, SECRET,
                            algorithm="HS256")
    joined = await alice.request({"type": "join", "room": "vip:gold", "token": room_token,
                                  "id": "j"})
    assert joined["type"] == "joined"
    assert (await alice.request({"type": "leave", "room": "vip:gold", "id": "l"}))["type"] \
        == "left"
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)  # The grant's own deadline.
    for request in ({"type": "join", "room": "vip:gold", "id": "j2"},
                    {"type": "history", "room": "vip:gold", "id": "h"}):
        reply = await alice.request(request)
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply


@pytest.mark.parametrize("exp", [10**20, 2**64, 1e300])
async def test_an_absurd_exp_is_refused_not_a_crash(start_node: StartNode, exp: float) -> None:
    """An exp past what an envelope can carry is refused with 401, not a 1011 crash."""
    node = jwt_node(start_node)
    token = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    response = await refused_handshake(node.ws(f"/ws?token={token}"))
    assert response.status_code == 401
    assert not node.logged("handler crashed")
