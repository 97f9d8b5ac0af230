// roomcast.js: the browser client of roomcast's native protocol (docs/PROTOCOL.md, sections 2-8
// and 12). One dependency-free ES module; docs/CLIENT_JS.md is its reference, roomcast.d.ts its
// types. It mirrors node/roomcast/tools/client.py: exactly-once delivery by offset, rejoin with
// `since`, the drain's reconnect hint, full-jitter backoff.

/** Close codes after which a client reconnects (PROTOCOL.md section 8); also 4000-4499. */
const RECONNECT_CODES = [1001, 1006, 1011, 1012, 1013];
/** Rejoin refusals that may clear up by themselves: reconnect later instead of forgetting the
 * room (`nick_taken` is usually our own previous connection, not yet dropped by its node). */
const RETRY_LATER = ["unavailable", "nick_taken", "internal", "rate_limited"];
/** Own messages remembered per room to settle publishes whose ack a dropped connection lost. */
const MINE_KEPT = 256;

/**
 * Whether a client that saw close `code` should reconnect: 1001, 1006, 1011, 1012, 1013 and
 * the transient application range 4000-4499. Everything else (1000, 1008, 1009, 4500-4999, ...)
 * is terminal. `null`/`undefined` (a socket that just died) counts as 1006.
 * @param {number | null | undefined} code
 * @returns {boolean}
 */
export function shouldReconnect(code) {
  return code == null || RECONNECT_CODES.includes(code) || (code >= 4000 && code <= 4499);
}

/**
 * Milliseconds to wait before reconnect attempt `attempt` (0 = the first): "full jitter",
 * uniform over [0, min(cap, base * 2^attempt)], so that the clients of one lost node spread out.
 * @param {number} attempt @param {number} [base] @param {number} [cap] @param {() => number} [random]
 * @returns {number}
 */
export function backoffDelay(attempt, base = 500, cap = 20000, random = Math.random) {
  return random() * Math.min(cap, base * 2 ** Math.min(Math.max(attempt, 0), 40));
}

/** The base of every error this module gives; `code` says which (PROTOCOL.md section 4). */
export class RoomcastError extends Error {
  constructor(code, message, extra) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    Object.assign(this, extra);
  }
}

/** The node answered with an `error` envelope: `code` is its error code, `reply` the envelope,
 * `retryAfterMs` set for `rate_limited`. */
export class ServerError extends RoomcastError {
  constructor(reply) {
    super(String(reply.code), String(reply.message ?? reply.code), { reply });
    if (reply.code === "rate_limited") this.retryAfterMs = Math.max(1, +reply.retry_after_ms || 1);
  }
}

/** The connection dropped before the reply came. For a publish: it may or may not be stored. */
export class ConnectionLostError extends RoomcastError {
  constructor(message = "the connection dropped before the reply came") {
    super("connection_lost", message);
  }
}

/** The client stopped: `disconnect()` (closeCode 1000) or a terminal close code. */
export class ClosedError extends RoomcastError {
  constructor(closeCode, reason = "") {
    super("closed", `connection closed with code ${closeCode}${reason ? ` (${reason})` : ""}`,
      { closeCode, reason });
  }
}

/** `history({since})` cannot continue from `since` without a gap; `offset`/`epoch` are the
 * room's current position: fetch again without `since`. */
export class HistoryUnavailableError extends RoomcastError {
  constructor(offset, epoch) {
    super("history_unavailable", "the history since that position is no longer available",
      { offset, epoch });
  }
}

const error = (code, message) => new RoomcastError(code, message);

class Emitter {
  constructor() { this._handlers = new Map(); }

  /** Call `handler` on every `event`; returns a function that removes it. */
  on(event, handler) {
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this._handlers.get(event)?.delete(handler);
    return this;
  }

  _emit(event, ...args) {
    for (const handler of [...(this._handlers.get(event) ?? [])]) {
      // A throwing handler must not break the client: report it as uncaught, carry on.
      try { handler(...args); } catch (e) { (globalThis.reportError ?? ((x) => setTimeout(() => { throw x; })))(e); }
    }
  }
}

/**
 * One room of a `Roomcast` client (from `rc.room(name)`). Events: `message` (a message
 * envelope, once each, in offset order), `join` / `leave` (`user_joined` / `user_left`, and
 * one per user of a large room's `presence_diff`),
 * `typing`, `gap` (messages may be missing: reload the view), `joined` (each (re)join),
 * `left` (the server took this connection out of the room, or a rejoin was refused for good).
 */
class Room extends Emitter {
  constructor(client, name, since) {
    super();
    this.client = client;
    this.name = name;
    this._forget(since);
    this._typedAt = -Infinity;
    this._typingTimer = null;
  }

  /** `{offset, epoch}` of the last message delivered (a rejoin resumes after it), or null. */
  get position() { return this._epoch == null ? null : { offset: this._offset, epoch: this._epoch }; }

  /** True while the room is wanted: joined, or to be joined on the next connection. */
  get joined() { return this._wanted; }

  /** Join (with an optional `nick`); resolves with the `joined` reply. Rejoined after every
   * reconnect, resuming from `position`. */
  join({ nick } = {}) { return this.client._join(this, nick); }

  /** Leave; the room is forgotten (its position too), so a reconnect does not rejoin it. */
  leave() { return this.client._leave(this); }

  /** Publish `data` (any JSON value); resolves with `{offset, epoch}` once the node stored it.
   * While disconnected, publishes wait in a bounded queue (`publishQueue`) and go out in
   * order after the reconnect. */
  publish(data) {
    clearTimeout(this._typingTimer); // the message is what was being typed
    this._typingTimer = null;
    return this.client._publish(this, data);
  }

  /** Every connection in the room, cluster-wide (`user_id`, `username`, `node_id`, ...). */
  async presence() {
    return (await this.client._request({ type: "presence", room: this.name })).members ?? [];
  }

  /** Stored messages, oldest first: the newest `limit` (all without it), or those after
   * `since`. Pages (`more`) are fetched until done. Rejects with HistoryUnavailableError when
   * the messages after `since` are gone. */
  async history({ since, limit } = {}) {
    const out = [];
    let cursor = since;
    for (;;) {
      const body = { type: "history", room: this.name };
      if (limit != null) body.limit = limit - out.length;
      if (cursor) body.since = { offset: cursor.offset, epoch: cursor.epoch };
      const reply = await this.client._request(body);
      if (cursor && reply.recovered === false) {
        throw new HistoryUnavailableError(reply.offset, reply.epoch);
      }
      const page = reply.messages ?? [];
      out.push(...page);
      if (!reply.more || !page.length || (limit != null && out.length >= limit)) return out;
      cursor = { offset: page[page.length - 1].offset, epoch: reply.epoch };
    }
  }

  /** Tell the others "I am typing": at most one frame per `typingInterval` (1.5 s: above the
   * node's relay limit of one a second, so that none is dropped there). A call inside the
   * interval is sent at its end, once, unless a publish came first. Returns whether a frame
   * went out now. */
  typing() {
    const conn = this.client._conn;
    const wait = this._typedAt + this.client.options.typingInterval - Date.now();
    if (!conn?.ready || conn.draining) return false;
    if (wait > 0) {
      this._typingTimer ??= setTimeout(() => { this._typingTimer = null; this.typing(); }, wait);
      return false;
    }
    this._typedAt = Date.now();
    conn.ws.send(JSON.stringify({ type: "typing", room: this.name }));
    return true;
  }

  _forget(since) {
    this._wanted = false;
    this._confirmed = false; // a join was answered: later joins are rejoins
    this._joining = null; // the connection a join is under way on
    this._offset = since?.offset ?? 0;
    this._epoch = since?.epoch ?? null;
    this._recovered = false; // the last (re)join replayed from `since`
    this._replayTo = null; // {offset, epoch}: the replay after a recovered rejoin ends there
    this._mine = []; // own messages: {offset, epoch, json}
    this._acked = new Set(); // "epoch:offset" of own publishes that got their ack
    for (const w of this._waiters ?? []) w.reject(error("left", "the room was left"));
    this._waiters = [];
  }

  _replayDone() {
    const to = this._replayTo;
    return !to || this._epoch !== to.epoch || this._offset >= to.offset;
  }
}

/**
 * A connection to a roomcast cluster that reconnects and resumes on its own.
 *
 * `new Roomcast("wss://chat.example.com/ws", {getToken})`, then `rc.connect()`. States
 * (`rc.state`, event `state`): `disconnected`, `connecting`, `connected`, `reconnecting`,
 * `closed` (a terminal close code: no more attempts). Events: `state` (state, detail),
 * `connected` (the welcome, after every room is rejoined), `disconnected` ({code, reason,
 * reconnect, delay}), `error` (a RoomcastError no promise received).
 */
export class Roomcast extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      backoffBase: 500, backoffCap: 20000, stableAfter: 5000, requestTimeout: 10000,
      pingInterval: 25000, pongTimeout: 10000, publishQueue: 100, typingInterval: 1500,
      ...options,
    };
    this.state = "disconnected";
    /** The current connection's identity and node, from its `welcome` (null before). */
    this.user = null;
    this._token = options.token ?? null;
    this._stale = false; // the token expired: ask getToken for a new one
    this._rooms = new Map();
    this._conn = null;
    this._ids = 0;
    this._failures = 0;
    this._outbox = []; // publishes waiting for a usable connection, in order
    this._unconfirmed = []; // publishes sent on a lost connection, no ack: settled by replay
    this._waiters = []; // requests and connect() calls waiting for a usable connection
    this._timer = null;
    this._online = () => { if (this._timer) this._open(); };
  }

  /** The room `name` (one object per name). `since` ({offset, epoch}) makes its first join
   * recover from there. */
  room(name, { since } = {}) {
    let room = this._rooms.get(name);
    if (!room) this._rooms.set(name, (room = new Room(this, name, since)));
    else if (since && !room._wanted) room._forget(since);
    return room;
  }

  /** Start connecting (idempotent); resolves with the welcome once connected and every room
   * rejoined; rejects with ClosedError on a terminal close or `disconnect()`. Failed attempts
   * are retried with backoff. */
  connect() {
    if (this.state === "connected") return Promise.resolve(this.user);
    if (this.state === "disconnected" || this.state === "closed") {
      this._failures = 0;
      globalThis.addEventListener?.("online", this._online);
      this._set("connecting");
      this._open();
    }
    return this._usable().then(() => this.user);
  }

  /** Close with 1000 and stop reconnecting; everything waiting rejects with ClosedError. Rooms
   * stay wanted: a later `connect()` rejoins them where they were. */
  disconnect() {
    if (this.state === "disconnected") return;
    const conn = this._conn;
    this._closed(1000, "closed by the client", "disconnected");
    if (conn) conn.ws.close(1000);
  }

  // --- connections -----------------------------------------------------------------------

  async _open() {
    clearTimeout(this._timer);
    this._timer = null;
    const opts = this.options;
    let token = this._token;
    try {
      if (opts.getToken && (token == null || this._stale)) {
        token = this._token = await opts.getToken();
        this._stale = false;
      }
    } catch (e) {
      this._emit("error", e instanceof RoomcastError ? e : error("token", String(e?.message ?? e)));
      this._failures++;
      return this._retry(null, 1006, "getToken failed");
    }
    if (this.state === "disconnected" || this.state === "closed") return;
    let ws;
    try {
      ws = new (opts.WebSocket ?? globalThis.WebSocket)(this.url);
    } catch (e) {
      this._emit("error", error("bad_url", String(e?.message ?? e)));
      return this._closed(1006, "cannot open " + this.url, "closed");
    }
    const conn = {
      ws, token, pending: new Map(), joined: new Set(), opened: Date.now(), welcome: null,
      ready: false, draining: false, hint: null, lost: false, settle: null,
      seen: 0, pinged: 0,
      timer: setTimeout(() => this._drop(conn, "no welcome from the server"), opts.requestTimeout),
    };
    this._conn = conn;
    ws.onopen = () => {
      if (token != null || opts.anonymous) {
        ws.send(JSON.stringify(token != null ? { type: "connect", token, id: "connect" }
          : { type: "connect", id: "connect" }));
      }
    };
    ws.onmessage = (ev) => this._frame(conn, ev.data);
    ws.onclose = (ev) => this._lost(conn, ev.code, ev.reason);
  }

  /** The heartbeat: after `pingInterval` without a frame, ping; after `pongTimeout` more,
   * the connection is dead (the browser cannot see a silent TCP death) and is dropped. */
  _watch(conn) {
    clearTimeout(conn.timer);
    const { pingInterval, pongTimeout } = this.options;
    if (!(pingInterval > 0)) return;
    const tick = () => {
      const idle = Date.now() - conn.seen;
      if (idle >= pingInterval + pongTimeout) return this._drop(conn, "no reply from the server");
      if (idle >= pingInterval && conn.pinged <= conn.seen) {
        conn.pinged = Date.now();
        conn.ws.send(JSON.stringify({ type: "ping", id: "ping" }));
      }
      conn.timer = setTimeout(tick, (idle < pingInterval ? pingInterval : pingInterval + pongTimeout) - idle);
    };
    conn.seen = Date.now();
    tick();
  }

  /** Give up on `conn` as a dead socket (1006) without waiting for a closing handshake. */
  _drop(conn, reason) {
    if (conn.lost) return;
    conn.ws.onclose = conn.ws.onmessage = null;
    try { conn.ws.close(4000, reason); } catch { /* already closed */ }
    this._lost(conn, 1006, reason);
  }

  _frame(conn, raw) {
    if (conn.lost) return;
    let env;
    try { env = JSON.parse(raw); } catch { return; }
    if (!env || typeof env !== "object" || Array.isArray(env)) return;
    conn.seen = Date.now();
    const { type, id } = env;
    let request = id != null && conn.pending.get(id);
    if (!request && type === "error" && id == null && env.code === "rate_limited") {
      // An unreadable frame is refused without its id; the node serves frames in order, so
      // the refusal is the oldest request still waiting (as client.py does).
      request = conn.pending.values().next().value;
    }
    if (request) {
      conn.pending.delete(request.id);
      clearTimeout(request.timer);
      if (type === "error") return request.reject(new ServerError(env));
      if (type === "joined") this._joined(conn, request.room, request.body, env);
      return request.resolve(env);
    }
    const room = this._rooms.get(env.room);
    switch (type) {
      case "welcome": return this._welcome(conn, env);
      case "message": return room?._wanted && this._message(room, env);
      case "gap": return room?._wanted && this._gap(room, env);
      case "reconnect": conn.hint = env; conn.draining = true; return;
      case "refresh_required": this._stale = true; return this._refresh(conn);
      case "typing": return room?._wanted && room._emit("typing", env);
      case "user_joined": return room?._wanted && room._emit("join", env);
      case "user_left": return room?._wanted && room._emit("leave", env);
      case "presence_diff":
        // A large room's presence events, gathered: the same join/leave events, one per user.
        if (!room?._wanted) return;
        for (const user of env.joins) room._emit("join", { type: "user_joined", room: env.room, ...user });
        for (const user of env.leaves) room._emit("leave", { type: "user_left", room: env.room, ...user });
        return;
      case "left":
        if (!room?._wanted) return;
        room._forget();
        conn.joined.delete(room.name);
        return room._emit("left", { room: room.name, reason: env.reason ?? "left" });
      case "error":
        // The connect frame's refusal (a close follows), or "already connected" under
        // --auth none, which is harmless.
        if (!(id === "connect" && conn.welcome)) this._emit("error", new ServerError(env));
    }
  }

  async _welcome(conn, env) {
    if (conn.welcome) return;
    conn.welcome = env;
    this.user = env;
    this._watch(conn);
    const rooms = [...this._rooms.values()].filter((r) => r._wanted);
    try {
      await Promise.all(rooms.map((room) => this._joinOn(conn, room)));
    } catch (e) {
      // A rejoin that may work later (unavailable, nick_taken, no reply): back off, reconnect.
      if (!conn.lost) this._emit("error", e);
      return this._drop(conn, "rejoin failed");
    }
    if (conn.lost) return;
    conn.ready = true;
    this._set("connected");
    this._emit("connected", env);
    for (const w of this._waiters.splice(0)) w.resolve(conn);
    if (this._unconfirmed.length) {
      conn.settle = setTimeout(() => this._settle(conn, true), this.options.requestTimeout);
    }
    this._settle(conn);
  }

  _lost(conn, code, reason = "") {
    if (conn.lost) return;
    conn.lost = true;
    clearTimeout(conn.timer);
    clearTimeout(conn.settle);
    if (this._conn === conn) this._conn = null;
    code = code ?? 1006;
    // A lasting connection starts the backoff over; a short one counts as a failure.
    this._failures = conn.welcome && Date.now() - conn.opened >= this.options.stableAfter
      ? 0 : this._failures + 1;
    if (code === 4002 || code === 4502) this._stale = true;
    const stopped = this.state === "disconnected" || this.state === "closed";
    // 4502 (an expired token at connect) is terminal as is; with getToken, a fresh one is
    // worth one more try.
    const again = !stopped && (shouldReconnect(code) ||
      (code === 4502 && this.options.getToken && !this._tokenRetry));
    for (const request of conn.pending.values()) {
      clearTimeout(request.timer);
      const p = request.publish;
      if (p && again && p.after && !p.done) this._unconfirmed.push(p);
      else request.reject(again ? new ConnectionLostError() : new ClosedError(code, reason));
    }
    conn.pending.clear();
    if (stopped) return;
    if (!again) return this._closed(code, reason, "closed");
    this._retry(conn, code, reason);
  }

  _retry(conn, code, reason) {
    const delay = conn?.hint ? this._useHint(conn) : backoffDelay(
      this._failures, this.options.backoffBase, this.options.backoffCap, this.options.random);
    const detail = { code, reason, reconnect: true, delay };
    this._set(this.state === "connecting" ? "connecting" : "reconnecting", detail);
    this._emit("disconnected", detail);
    this._tokenRetry = code === 4502;
    this._timer = setTimeout(() => this._open(), delay);
  }

  /** Adopt a drain hint's newer room positions; its `retry_after_ms` replaces the first wait. */
  _useHint(conn) {
    const { rooms, retry_after_ms: wait } = conn.hint;
    for (const [name, pos] of Object.entries(rooms && typeof rooms === "object" ? rooms : {})) {
      const room = this._rooms.get(name);
      // A room whose join was not answered on this connection is skipped: the node's position
      // may count messages it never sent us.
      if (!room?._wanted || !conn.joined.has(name) || typeof pos?.offset !== "number" ||
          typeof pos.epoch !== "string") continue;
      if (room._epoch == null || (pos.epoch === room._epoch && pos.offset > room._offset)) {
        room._offset = pos.offset;
        room._epoch = pos.epoch;
      }
    }
    return typeof wait === "number" && wait >= 0 ? wait : backoffDelay(this._failures,
      this.options.backoffBase, this.options.backoffCap, this.options.random);
  }

  /** Stop for good: state `closed` (terminal code) or `disconnected`; fail what waits. */
  _closed(code, reason, state) {
    clearTimeout(this._timer);
    this._timer = null;
    globalThis.removeEventListener?.("online", this._online);
    const conn = this._conn;
    this._conn = null;
    const err = new ClosedError(code, reason);
    if (conn) {
      conn.lost = true;
      clearTimeout(conn.timer);
      for (const r of conn.pending.values()) { clearTimeout(r.timer); r.reject(err); }
    }
    for (const p of this._outbox.splice(0)) p.reject(err);
    for (const p of this._unconfirmed.splice(0)) p.reject(err);
    for (const w of this._waiters.splice(0)) w.reject(err);
    for (const room of this._rooms.values()) {
      for (const w of room._waiters.splice(0)) w.reject(err);
    }
    const detail = { code, reason, reconnect: false };
    this._set(state, detail);
    this._emit("disconnected", detail);
  }

  _set(state, detail) {
    this.state = state;
    this._emit("state", state, detail);
  }

  async _refresh(conn) {
    if (!this.options.getToken) return;
    try {
      const token = (this._token = await this.options.getToken());
      this._stale = false;
      if (!conn.lost) await this._send(conn, { type: "refresh", token });
    } catch (e) {
      // The node closes with 4002 after its grace; the reconnect asks getToken again.
      this._emit("error", e);
    }
  }

  // --- requests --------------------------------------------------------------------------

  /** A connection usable for requests: open, welcomed, rooms rejoined, not draining. */
  _usable() {
    const conn = this._conn;
    if (conn?.ready && !conn.draining) return Promise.resolve(conn);
    if (this.state === "closed") return Promise.reject(new ClosedError(1000, "closed"));
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /** Send `body` with a fresh id on `conn`; resolve with the reply, reject with its error. */
  _send(conn, body, extra = {}) {
    return new Promise((resolve, reject) => {
      const id = ++this._ids;
      const request = { id, body, resolve, reject, ...extra };
      request.timer = setTimeout(() => {
        // Kept in `pending`: its late reply must still be matched, and then ignored.
        request.resolve = request.reject = () => {};
        reject(error("timeout", `no reply to ${body.type} within ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      conn.pending.set(id, request);
      conn.ws.send(JSON.stringify({ ...body, id }));
    });
  }

  /** An idempotent request: waits for a usable connection and is sent again if the
   * connection drops under it, for at most `requestTimeout` in all. */
  async _request(body) {
    const deadline = Date.now() + this.options.requestTimeout;
    for (;;) {
      let timer;
      const conn = await Promise.race([this._usable(), new Promise((_, reject) => {
        timer = setTimeout(() => reject(error("timeout", `not connected within ${this.options.requestTimeout} ms`)),
          Math.max(0, deadline - Date.now()));
      })]).finally(() => clearTimeout(timer));
      try {
        return await this._send(conn, body);
      } catch (e) {
        if (!(e instanceof ConnectionLostError) || Date.now() > deadline) throw e;
      }
    }
  }

  _join(room, nick) {
    if (nick !== undefined) room._nick = nick;
    room._wanted = true;
    if (this.state === "closed") return Promise.reject(new ClosedError(1000, "closed"));
    const joined = new Promise((resolve, reject) => room._waiters.push({ resolve, reject }));
    const conn = this._conn;
    if (conn?.ready) {
      this._joinOn(conn, room).catch((e) => { this._emit("error", e); this._drop(conn, "rejoin failed"); });
    }
    return joined;
  }

  /** Join `room` on `conn` (a first join or a rejoin with `since`). A refusal for good forgets
   * the room; one that may clear up (on a rejoin) throws, and the caller reconnects later. */
  async _joinOn(conn, room) {
    if (room._joining === conn) return;
    room._joining = conn;
    const body = { type: "join", room: room.name };
    if (room._nick != null) body.nick = room._nick;
    if (room._epoch != null) body.since = { offset: room._offset, epoch: room._epoch };
    const rejoin = conn.joined.has(room.name) || room._confirmed;
    for (let tries = 1; ; tries++) {
      try {
        return await this._send(conn, body, { room });
      } catch (e) {
        if (room._joining === conn) room._joining = null;
        if (!(e instanceof ServerError)) {
          if (conn.lost) return; // the next connection joins it
          throw e;
        }
        if (e.code === "rate_limited" && tries < 5) {
          await new Promise((resolve) => setTimeout(resolve, e.retryAfterMs));
          if (conn.lost) return;
          room._joining = conn;
          continue;
        }
        if (rejoin && RETRY_LATER.includes(e.code)) throw e;
        const waiters = room._waiters.splice(0);
        room._forget();
        for (const w of waiters) w.reject(e);
        if (rejoin) room._emit("left", { room: room.name, reason: e.code, error: e });
        return;
      }
    }
  }

  /** The `joined` reply, handled before the replayed and live messages right behind it. */
  _joined(conn, room, body, reply) {
    if (room._joining === conn) room._joining = null;
    conn.joined.add(room.name);
    const { offset, epoch } = reply;
    if (!room._wanted) { // left while the join was under way: leave again
      conn.joined.delete(room.name);
      this._send(conn, { type: "leave", room: room.name }).catch(() => {});
      return;
    }
    if (typeof offset === "number" && typeof epoch === "string") {
      const recovered = !!body.since && reply.recovered !== false;
      room._recovered = recovered;
      room._replayTo = recovered ? { offset, epoch } : null;
      if (recovered) {
        room._offset = body.since.offset; // the replay that follows starts right after it
        room._epoch = body.since.epoch;
      } else {
        room._offset = offset;
        room._epoch = epoch;
      }
      room._emit("joined", { room: room.name, offset, epoch, recovered, rejoin: !!room._confirmed });
      room._confirmed = true;
      if (body.since && !recovered) {
        room._emit("gap", { type: "gap", room: room.name, recovered: false, offset, epoch,
          reason: "recovery" });
      }
    }
    for (const w of room._waiters.splice(0)) w.resolve(reply);
  }

  _message(room, msg) {
    const { offset, epoch } = msg;
    if (typeof offset === "number" && typeof epoch === "string") {
      if (epoch === room._epoch && offset <= room._offset) return; // already delivered
      room._offset = offset;
      room._epoch = epoch;
      if (this.user && msg.from?.user_id === this.user.user_id) {
        room._mine.push({ offset, epoch, json: JSON.stringify(msg.data) });
        if (room._mine.length > MINE_KEPT) room._mine.shift();
      }
    }
    room._emit("message", msg);
    if (this._unconfirmed.length && this._conn?.ready) this._settle(this._conn);
  }

  /** The node lost messages history no longer has: delivery continues after the gap's
   * position, which becomes the room's (a rejoin must not ask for them again). */
  _gap(room, gap) {
    const { offset, epoch } = gap;
    if (typeof offset === "number" && typeof epoch === "string" &&
        (epoch !== room._epoch || offset > room._offset)) {
      room._offset = offset;
      room._epoch = epoch;
    }
    room._emit("gap", { ...gap, reason: "node" });
  }

  _publish(room, data) {
    return new Promise((resolve, reject) => {
      if (this.state === "closed") return reject(new ClosedError(1000, "closed"));
      let json;
      try { json = JSON.stringify(data); } catch (e) { json = undefined; }
      if (json === undefined) return reject(error("bad_request", "data must be a JSON value"));
      const p = {
        room, data, json, after: null, done: false,
        resolve: (v) => { p.done = true; resolve(v); },
        reject: (e) => { p.done = true; reject(e); },
      };
      const conn = this._conn;
      if (conn?.ready && !conn.draining && !this._outbox.length && !this._unconfirmed.length) {
        this._sendPublish(conn, p);
      } else if (this._outbox.length >= this.options.publishQueue) {
        reject(error("queue_full", `${this.options.publishQueue} publishes already wait for the connection`));
      } else {
        this._outbox.push(p);
      }
    });
  }

  _sendPublish(conn, p) {
    const { room } = p;
    // Where the room stood when this left: should the ack be lost with the connection, the
    // message (if stored) is the first own one after it with the same data.
    p.after = room._wanted && room._epoch != null && conn.joined.has(room.name)
      ? { offset: room._offset, epoch: room._epoch } : null;
    this._send(conn, { type: "publish", room: room.name, data: p.data }, { publish: p }).then(
      (ack) => {
        room._acked.add(`${ack.epoch}:${ack.offset}`);
        if (room._acked.size > MINE_KEPT) room._acked.delete(room._acked.values().next().value);
        p.resolve({ offset: ack.offset, epoch: ack.epoch });
      }, p.reject);
  }

  /** Settle the publishes a lost connection left without an ack, in order, then send the
   * queue. A publish whose room was recovered is found in the room's stream once the replay
   * is over: the first own message after its `after` with the same data and no ack of its own
   * is it (resolved, not resent); none: it was never stored, and it is sent again. Any other
   * rejects with ConnectionLostError: it may or may not have been published. */
  _settle(conn, timedOut = false) {
    const resend = [];
    while (this._unconfirmed.length) {
      const p = this._unconfirmed[0];
      const { room, after } = p;
      const known = room._wanted && room._recovered && room._epoch === after.epoch;
      if (known && !room._replayDone() && !timedOut) break; // more of the replay to come
      this._unconfirmed.shift();
      const mine = known && room._mine.find((m) => m.epoch === after.epoch && m.offset > after.offset &&
        m.json === p.json && !room._acked.has(`${m.epoch}:${m.offset}`));
      if (mine) {
        room._acked.add(`${mine.epoch}:${mine.offset}`);
        p.resolve({ offset: mine.offset, epoch: mine.epoch });
      } else if (known && !timedOut) {
        resend.push(p);
      } else {
        p.reject(new ConnectionLostError("the connection dropped before the ack: the message may or may not have been published"));
      }
    }
    this._outbox.unshift(...resend);
    if (this._unconfirmed.length) return;
    clearTimeout(conn.settle);
    while (this._outbox.length && conn.ready && !conn.draining && !conn.lost) {
      this._sendPublish(conn, this._outbox.shift());
    }
  }

  async _leave(room) {
    const conn = this._conn;
    const wasIn = conn?.joined.has(room.name);
    room._forget();
    if (!conn?.ready || !wasIn) return;
    conn.joined.delete(room.name);
    try {
      await this._send(conn, { type: "leave", room: room.name });
    } catch (e) {
      if (!(e instanceof ConnectionLostError) && e.code !== "not_joined") throw e;
    }
  }
}
