// A fake WebSocket and small helpers for the unit tests: the test plays the node, frame by frame.

import { Roomcast } from "../roomcast.js";

export class FakeSocket {
  static all = [];

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }

  /** The node accepts the handshake (the browser fires onopen). */
  open() { this.onopen?.({}); }

  send(data) {
    if (this.closed) return;
    this.sent.push(JSON.parse(data));
  }

  close(code = 1000, reason = "") {
    if (this.closed) return;
    this.closed = { code, reason };
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  /** The node sends one envelope. */
  receive(envelope) { this.onmessage?.({ data: JSON.stringify(envelope) }); }

  /** The node closes with `code` (or the TCP connection dies: 1006). */
  drop(code = 1006, reason = "") {
    this.closed = { code, reason, byServer: true };
    this.onclose?.({ code, reason });
  }

  /** The frames the client sent of `type`. */
  of(type) { return this.sent.filter((f) => f.type === type); }

  last(type) { return this.of(type).at(-1); }
}

/** Wait (bounded) until `predicate()` is truthy; return its value. */
export async function until(predicate, what = "condition", ms = 2000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

/** A client on the fake socket with fast timers; `options` override. */
export function client(options = {}) {
  FakeSocket.all = [];
  return new Roomcast("ws://node.test/ws?user_id=me", {
    WebSocket: FakeSocket, backoffBase: 1, backoffCap: 4, random: () => 1, pingInterval: 0,
    requestTimeout: 500, ...options,
  });
}

/** The newest socket, once the client opened it. */
export const socket = (n = 1) => until(() => FakeSocket.all.length >= n && FakeSocket.all[n - 1],
  `socket ${n}`);

export const welcome = (user = "me") => ({
  type: "welcome", conn_id: "c1", node_id: "n1", user_id: user, username: user.toUpperCase(),
});

/** Answer the client's pending request of `type` (the newest one) with `reply`. */
export async function answer(ws, type, reply) {
  const request = await until(() => ws.last(type), `a ${type} request`);
  ws.receive({ ...reply, id: request.id });
  return request;
}

export const message = (room, offset, data, user = "other", epoch = "e1") => ({
  type: "message", room, data, from: { user_id: user, username: user }, ts: 1700000000000 + offset,
  offset, epoch,
});

/** A connected client whose room `room` is joined at `offset`. */
export async function joined(room = "r", offset = 0, options = {}) {
  const rc = client(options);
  const connected = rc.connect();
  const ws = await socket();
  ws.open();
  ws.receive(welcome());
  await connected;
  const r = rc.room(room);
  const join = r.join();
  await answer(ws, "join", { type: "joined", room, offset, epoch: "e1" });
  await join;
  return { rc, ws, room: r };
}
