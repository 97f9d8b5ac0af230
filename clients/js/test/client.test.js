// The client against a fake node: recovery and dedup, reconnects, publishes, tokens, errors.

import assert from "node:assert/strict";
import { test } from "node:test";

import { ClosedError, ConnectionLostError, HistoryUnavailableError, ServerError } from "../roomcast.js";
import { FakeSocket, answer, client, joined, message, socket, until, welcome } from "./fake.js";

/** Collect a room's events of `type`. */
function collect(emitter, type) {
  const seen = [];
  emitter.on(type, (event) => seen.push(event));
  return seen;
}

/** The node drains: the hint, then 1012. */
function drain(ws, rooms = {}, wait = 0) {
  ws.receive({ type: "reconnect", retry_after_ms: wait, rooms });
  ws.drop(1012, "service restart");
}

/** Accept the next connection and answer its welcome; return the socket. */
async function next(n) {
  const ws = await socket(n);
  ws.open();
  ws.receive(welcome());
  return ws;
}

test("connect resolves with the welcome; states go connecting -> connected", async () => {
  const rc = client();
  const states = collect(rc, "state");
  const connected = rc.connect();
  const ws = await socket();
  assert.equal(ws.url, "ws://node.test/ws?user_id=me");
  ws.open();
  assert.deepEqual(ws.sent, [], "no token: no connect frame (--auth none)");
  ws.receive(welcome());
  const user = await connected;
  assert.equal(user.user_id, "me");
  assert.equal(rc.state, "connected");
  assert.deepEqual(states, ["connecting", "connected"]);
  rc.disconnect();
  assert.equal(rc.state, "disconnected");
  assert.deepEqual(ws.closed, { code: 1000, reason: "" });
});

test("messages are delivered once each: duplicates and old offsets are dropped", async () => {
  const { rc, ws, room } = await joined("r", 3);
  const seen = collect(room, "message");
  for (const offset of [3, 4, 5, 4, 5, 6]) ws.receive(message("r", offset, `m${offset}`));
  assert.deepEqual(seen.map((m) => m.offset), [4, 5, 6]);
  assert.deepEqual(room.position, { offset: 6, epoch: "e1" });
  ws.receive(message("r", 1, "new epoch", "other", "e2"));
  assert.deepEqual(seen.map((m) => m.offset), [4, 5, 6, 1], "a new epoch starts over");
  ws.receive(message("elsewhere", 9, "not joined"));
  assert.equal(seen.length, 4);
  rc.disconnect();
});

test("after a drain it waits retry_after_ms, rejoins with since and delivers no duplicate", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const seen = collect(room, "message");
  const states = collect(rc, "state");
  const gone = collect(rc, "disconnected");
  ws.receive(message("r", 1, "a"));
  ws.receive(message("r", 2, "b"));
  // The hint's position is newer than what this client saw: every message up to it was sent
  // before the hint, so the client adopts it.
  drain(ws, { r: { offset: 2, epoch: "e1" } }, 5);
  assert.equal(rc.state, "reconnecting");
  assert.deepEqual(gone[0], { code: 1012, reason: "service restart", reconnect: true, delay: 5 });
  const ws2 = await next(2);
  const rejoin = await answer(ws2, "join", { type: "joined", room: "r", offset: 4, epoch: "e1",
    recovered: true });
  assert.deepEqual(rejoin.since, { offset: 2, epoch: "e1" });
  // The replay, overlapping what came live.
  for (const offset of [2, 3, 4]) ws2.receive(message("r", offset, `m${offset}`));
  await until(() => rc.state === "connected", "connected");
  ws2.receive(message("r", 5, "live"));
  assert.deepEqual(seen.map((m) => m.offset), [1, 2, 3, 4, 5]);
  assert.deepEqual(states, ["reconnecting", "connected"]);
  rc.disconnect();
});

test("a hint is ignored for a room not joined on that connection, and when older", async () => {
  const { rc, ws, room } = await joined("r", 5);
  rc.room("other").join().catch(() => {}); // sent, never answered
  drain(ws, { r: { offset: 3, epoch: "e1" }, other: { offset: 9, epoch: "e1" } });
  const ws2 = await next(2);
  const joins = await until(() => ws2.of("join").length === 2 && ws2.of("join"), "two rejoins");
  assert.deepEqual(joins.find((j) => j.room === "r").since, { offset: 5, epoch: "e1" });
  assert.equal(joins.find((j) => j.room === "other").since, undefined);
  assert.deepEqual(room.position, { offset: 5, epoch: "e1" });
  rc.disconnect();
});

test("recovered:false fires gap with the room's new position", async () => {
  const { rc, ws, room } = await joined("r", 7);
  const gaps = collect(room, "gap");
  ws.drop(1006);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 40, epoch: "e2",
    recovered: false });
  await until(() => gaps.length, "gap");
  assert.deepEqual(gaps[0], { type: "gap", room: "r", recovered: false, offset: 40, epoch: "e2",
    reason: "recovery" });
  assert.deepEqual(room.position, { offset: 40, epoch: "e2" });
  rc.disconnect();
});

test("a node's gap envelope moves the position and is passed on", async () => {
  const { rc, ws, room } = await joined("r", 2);
  const gaps = collect(room, "gap");
  ws.receive({ type: "gap", room: "r", recovered: false, offset: 14, epoch: "e1" });
  assert.equal(gaps[0].reason, "node");
  assert.deepEqual(room.position, { offset: 14, epoch: "e1" });
  ws.receive(message("r", 14, "lost"));
  const seen = collect(room, "message");
  ws.receive(message("r", 15, "next"));
  assert.deepEqual(seen.map((m) => m.offset), [15]);
  rc.disconnect();
});

test("a terminal close stops for good: state closed, no new attempt, requests rejected", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const gone = collect(rc, "disconnected");
  const pending = room.publish("x");
  ws.drop(4500, "disconnected");
  assert.equal(rc.state, "closed");
  assert.deepEqual(gone, [{ code: 4500, reason: "disconnected", reconnect: false }]);
  await assert.rejects(pending, (e) => e instanceof ClosedError && e.closeCode === 4500);
  await assert.rejects(room.publish("y"), ClosedError);
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(FakeSocket.all.length, 1, "no reconnect after 4500");
});

for (const code of [1000, 1008, 1009, 4501, 4999]) {
  test(`close ${code} is terminal`, async () => {
    const { rc, ws } = await joined("r", 0);
    ws.drop(code);
    assert.equal(rc.state, "closed");
  });
}

test("failed attempts back off with growing delays; a lasting connection starts over", async () => {
  const delays = [];
  const rc = client({ random: () => 1, backoffBase: 1, backoffCap: 8, stableAfter: 60000 });
  rc.on("disconnected", (d) => delays.push(d.delay));
  rc.connect().catch(() => {});
  for (let n = 1; n <= 5; n++) (await socket(n)).drop(1006); // refused handshakes
  assert.deepEqual(delays, [2, 4, 8, 8, 8]);
  assert.equal(rc.state, "connecting", "still the first connection");
  rc.disconnect();
});

test("publishes while disconnected wait in order and go out after the rejoin", async () => {
  const { rc, ws, room } = await joined("r", 0);
  ws.drop(1006);
  const acks = [room.publish("one"), room.publish({ two: 2 })];
  const ws2 = await socket(2);
  ws2.open();
  ws2.receive(welcome());
  assert.deepEqual(ws2.of("publish"), [], "not before the room is rejoined");
  await answer(ws2, "join", { type: "joined", room: "r", offset: 0, epoch: "e1", recovered: true });
  const sent = await until(() => ws2.of("publish").length === 2 && ws2.of("publish"), "publishes");
  assert.deepEqual(sent.map((p) => p.data), ["one", { two: 2 }]);
  sent.forEach((p, i) => ws2.receive({ type: "published", room: "r", offset: i + 1, epoch: "e1",
    id: p.id }));
  assert.deepEqual(await Promise.all(acks), [{ offset: 1, epoch: "e1" }, { offset: 2, epoch: "e1" }]);
  rc.disconnect();
});

test("the publish queue is bounded: one past publishQueue rejects with queue_full", async () => {
  const { rc, ws, room } = await joined("r", 0, { publishQueue: 2 });
  ws.drop(1006);
  room.publish(1).catch(() => {});
  room.publish(2).catch(() => {});
  await assert.rejects(room.publish(3), (e) => e.code === "queue_full");
  rc.disconnect();
});

test("during a drain (after the hint) publishes are held for the next connection", async () => {
  const { rc, ws, room } = await joined("r", 0);
  ws.receive({ type: "reconnect", retry_after_ms: 0, rooms: {} });
  const ack = room.publish("held");
  assert.deepEqual(ws.of("publish"), []);
  ws.drop(1012);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 0, epoch: "e1", recovered: true });
  await answer(ws2, "publish", { type: "published", room: "r", offset: 1, epoch: "e1" });
  assert.deepEqual(await ack, { offset: 1, epoch: "e1" });
  rc.disconnect();
});

test("a publish whose ack was lost but which was stored resolves from the replay, unsent", async () => {
  const { rc, ws, room } = await joined("r", 3);
  const seen = collect(room, "message");
  const ack = room.publish({ text: "hi" });
  const later = room.publish("after");
  await until(() => ws.of("publish").length === 2, "two publishes");
  ws.drop(1006); // neither ack came
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 5, epoch: "e1", recovered: true });
  // Offset 4 is someone else's; offset 5 is ours ("hi"); "after" was never stored.
  ws2.receive(message("r", 4, { text: "hi" }, "other"));
  ws2.receive(message("r", 5, { text: "hi" }, "me"));
  assert.deepEqual(await ack, { offset: 5, epoch: "e1" });
  const resent = await until(() => ws2.of("publish").length && ws2.of("publish"), "the resend");
  assert.deepEqual(resent.map((p) => p.data), ["after"], "only the one not stored is resent");
  await answer(ws2, "publish", { type: "published", room: "r", offset: 6, epoch: "e1" });
  assert.deepEqual(await later, { offset: 6, epoch: "e1" });
  assert.deepEqual(seen.map((m) => m.offset), [4, 5]);
  rc.disconnect();
});

test("an own message that got its ack is not taken for a lost publish with the same data", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const first = room.publish("same");
  await answer(ws, "publish", { type: "published", room: "r", offset: 1, epoch: "e1" });
  ws.receive(message("r", 1, "same", "me"));
  await first;
  const second = room.publish("same");
  await until(() => ws.of("publish").length === 2, "second publish");
  ws.drop(1006);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 1, epoch: "e1", recovered: true });
  const resent = await until(() => ws2.of("publish")[0], "the resend");
  assert.equal(resent.data, "same");
  await answer(ws2, "publish", { type: "published", room: "r", offset: 2, epoch: "e1" });
  assert.deepEqual(await second, { offset: 2, epoch: "e1" });
  rc.disconnect();
});

test("a lost publish to a room that could not be recovered rejects with ConnectionLostError", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const ack = room.publish("x");
  const queued = room.publish("y");
  await until(() => ws.of("publish").length === 2, "publishes");
  ws.drop(1006);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 9, epoch: "e2", recovered: false });
  await assert.rejects(ack, ConnectionLostError);
  await assert.rejects(queued, ConnectionLostError);
  rc.disconnect();
});

test("presence and history wait for the connection and are sent again after a drop", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const members = room.presence();
  await until(() => ws.last("presence"), "presence sent");
  ws.drop(1006);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 0, epoch: "e1", recovered: true });
  await answer(ws2, "presence", { type: "presence", room: "r", count: 1,
    members: [{ user_id: "me", username: "ME" }] });
  assert.deepEqual((await members).map((m) => m.user_id), ["me"]);
  rc.disconnect();
});

test("history pages through `more` and stops at limit", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const got = room.history({ limit: 3 });
  const first = await answer(ws, "history", { type: "history", room: "r", offset: 9, epoch: "e1",
    more: true, messages: [message("r", 7, "a"), message("r", 8, "b")] });
  assert.deepEqual([first.limit, first.since], [3, undefined]);
  await until(() => ws.of("history").length === 2, "second page");
  const second = await answer(ws, "history", { type: "history", room: "r", offset: 9,
    epoch: "e1", recovered: true, messages: [message("r", 9, "c")] });
  assert.deepEqual([second.limit, second.since], [1, { offset: 8, epoch: "e1" }]);
  assert.deepEqual((await got).map((m) => m.data), ["a", "b", "c"]);

  const gone = room.history({ since: { offset: 1, epoch: "old" } });
  await until(() => ws.of("history").length === 3, "third request");
  await answer(ws, "history", { type: "history", room: "r", offset: 9, epoch: "e1",
    recovered: false, messages: [] });
  await assert.rejects(gone, (e) => e instanceof HistoryUnavailableError && e.offset === 9);
  rc.disconnect();
});

test("an error envelope becomes a ServerError with its code; rate_limited has retryAfterMs", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const refused = room.publish("x");
  await answer(ws, "publish", { type: "error", code: "rate_limited", message: "slow down",
    retry_after_ms: 50 });
  await assert.rejects(refused, (e) => e instanceof ServerError && e.code === "rate_limited" &&
    e.retryAfterMs === 50);
  const forbidden = rc.room("vip").join();
  await answer(ws, "join", { type: "error", code: "forbidden", message: "not allowed" });
  await assert.rejects(forbidden, (e) => e.code === "forbidden" && e.message === "not allowed");
  assert.equal(rc.room("vip").joined, false, "a refused join is forgotten");
  const errors = collect(rc, "error");
  ws.receive({ type: "error", code: "bad_request", message: "frame is not valid JSON" });
  assert.equal(errors[0].code, "bad_request");
  rc.disconnect();
});

test("a rejoin refused with nick_taken reconnects later instead of forgetting the room", async () => {
  const { rc, ws, room } = await joined("r", 0);
  ws.drop(1006);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "error", code: "nick_taken", message: "taken" });
  const ws3 = await next(3);
  await answer(ws3, "join", { type: "joined", room: "r", offset: 0, epoch: "e1", recovered: true });
  await until(() => rc.state === "connected", "connected");
  assert.equal(room.joined, true);
  rc.disconnect();
});

test("a rejoin refused for good forgets the room and fires left", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const left = collect(room, "left");
  ws.drop(1006);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "error", code: "forbidden", message: "no" });
  await until(() => left.length, "left");
  assert.equal(left[0].reason, "forbidden");
  assert.equal(room.joined, false);
  rc.disconnect();
});

test("user events and typing reach the room's handlers", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const joins = collect(room, "join");
  const leaves = collect(room, "leave");
  const typing = collect(room, "typing");
  ws.receive({ type: "user_joined", room: "r", user_id: "u2", username: "Bob", ts: 1 });
  ws.receive({ type: "typing", room: "r", from: { user_id: "u2", username: "Bob" } });
  ws.receive({ type: "user_left", room: "r", user_id: "u2", username: "Bob", ts: 2 });
  assert.deepEqual([joins[0].username, typing[0].from.username, leaves[0].user_id],
    ["Bob", "Bob", "u2"]);
  rc.disconnect();
});

test("a presence_diff reaches the handlers as one join or leave per user", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const joins = collect(room, "join");
  const leaves = collect(room, "leave");
  ws.receive({ type: "presence_diff", room: "r",
    joins: [{ user_id: "u2", username: "Bob", ts: 1 }, { user_id: "u3", username: "Cy", ts: 2 }],
    leaves: [{ user_id: "u4", username: "Di", ts: 3 }] });
  await until(() => leaves.length, "leave");
  assert.deepEqual(joins.map((e) => [e.type, e.room, e.user_id]),
    [["user_joined", "r", "u2"], ["user_joined", "r", "u3"]]);
  assert.deepEqual(leaves.map((e) => [e.type, e.user_id]), [["user_left", "u4"]]);
  rc.disconnect();
});

test("typing() sends at most one frame per typingInterval, the last call at its end", async () => {
  const { rc, ws, room } = await joined("r", 0, { typingInterval: 40 });
  assert.equal(room.typing(), true);
  assert.equal(room.typing(), false);
  assert.equal(room.typing(), false);
  assert.equal(ws.of("typing").length, 1);
  await until(() => ws.of("typing").length === 2, "the trailing frame");
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.deepEqual(ws.of("typing"), [{ type: "typing", room: "r" }, { type: "typing", room: "r" }]);
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(room.typing(), true, "a new interval");
  assert.equal(room.typing(), false);
  room.publish("done").catch(() => {});
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(ws.of("typing").length, 3, "a publish cancels the trailing frame");
  rc.disconnect();
});

test("leave forgets the room: no rejoin, no more messages", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const seen = collect(room, "message");
  const left = room.leave();
  await answer(ws, "leave", { type: "left", room: "r" });
  await left;
  ws.receive(message("r", 1, "late"));
  assert.equal(seen.length, 0);
  ws.drop(1006);
  const ws2 = await next(2);
  await until(() => rc.state === "connected", "connected");
  assert.deepEqual(ws2.of("join"), []);
  rc.disconnect();
});

test("a token goes in a connect frame; refresh_required asks getToken; 4002 reconnects with a new one", async () => {
  let n = 0;
  const rc = client({ getToken: async () => `t${++n}` });
  const connected = rc.connect();
  const ws = await socket();
  ws.open();
  assert.deepEqual(ws.sent, [{ type: "connect", token: "t1", id: "connect" }]);
  ws.receive({ ...welcome(), id: "connect" });
  await connected;
  ws.receive({ type: "refresh_required", grace_ms: 25000 });
  const refresh = await until(() => ws.last("refresh"), "refresh");
  assert.equal(refresh.token, "t2");
  ws.receive({ type: "refreshed", expires_at: 2, id: refresh.id });
  ws.drop(4002, "token expired");
  const ws2 = await socket(2);
  ws2.open();
  assert.equal(ws2.last("connect").token, "t3");
  rc.disconnect();
});

test("4502 with getToken is tried once more with a fresh token, then terminal", async () => {
  let n = 0;
  const rc = client({ getToken: () => `t${++n}` });
  rc.connect().catch(() => {});
  (await socket(1)).drop(4502, "expired");
  const ws2 = await socket(2);
  ws2.open();
  assert.equal(ws2.last("connect").token, "t2");
  ws2.drop(4502, "expired");
  assert.equal(rc.state, "closed");
});

test("a static token is sent as is; a refused connect frame is reported as an error", async () => {
  const rc = client({ token: "abc" });
  const errors = collect(rc, "error");
  const connected = rc.connect();
  const ws = await socket();
  ws.open();
  ws.receive({ type: "error", code: "unauthorized", message: "signature does not verify",
    id: "connect" });
  ws.drop(4501, "unauthorized");
  await assert.rejects(connected, (e) => e instanceof ClosedError && e.closeCode === 4501);
  assert.equal(errors[0].code, "unauthorized");
  assert.equal(ws.sent[0].token, "abc");
});

test("heartbeat: a quiet connection is pinged, and dropped when nothing answers", async () => {
  const { rc, ws } = await joined("r", 0, { pingInterval: 20, pongTimeout: 20 });
  await until(() => ws.of("ping").length, "a ping");
  await until(() => ws.closed, "the drop");
  assert.equal(ws.closed.code, 4000);
  const ws2 = await next(2);
  await answer(ws2, "join", { type: "joined", room: "r", offset: 0, epoch: "e1", recovered: true });
  await until(() => rc.state === "connected", "reconnected");
  rc.disconnect();
});

test("no welcome within requestTimeout: the attempt is dropped and retried", async () => {
  const rc = client({ requestTimeout: 20 });
  rc.connect();
  (await socket(1)).open();
  await next(2);
  await until(() => rc.state === "connected", "connected");
  rc.disconnect();
});

test("a throwing handler does not break delivery to the others", async () => {
  const { rc, ws, room } = await joined("r", 0);
  const uncaught = [];
  globalThis.reportError = (e) => uncaught.push(e);
  room.on("message", () => { throw new Error("app bug"); });
  const seen = collect(room, "message");
  ws.receive(message("r", 1, "x"));
  assert.equal(seen.length, 1);
  delete globalThis.reportError;
  assert.equal(uncaught[0].message, "app bug");
  rc.disconnect();
});

test("rc.room(name) is one object per name; since makes the first join recover", async () => {
  const rc = client();
  const room = rc.room("r", { since: { offset: 4, epoch: "e1" } });
  assert.equal(rc.room("r"), room);
  room.join();
  const connected = rc.connect();
  const ws = await next(1);
  const join = await answer(ws, "join", { type: "joined", room: "r", offset: 4, epoch: "e1",
    recovered: true });
  assert.deepEqual(join.since, { offset: 4, epoch: "e1" });
  await connected;
  rc.disconnect();
});
