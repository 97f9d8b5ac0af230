// Type declarations of roomcast.js, the browser client of roomcast (docs/CLIENT_JS.md).

/** A room's position: the offset and epoch of a message (docs/PROTOCOL.md section 6). */
export interface Position {
  offset: number;
  epoch: string;
}

export interface Sender {
  user_id: string;
  username: string;
}

/** A publication in a room, live, replayed or from history. */
export interface MessageEnvelope<T = unknown> {
  type: "message";
  room: string;
  data: T;
  from: Sender;
  /** Unix time in milliseconds, set by the node that accepted the publish. */
  ts: number;
  offset: number;
  epoch: string;
}

export interface UserEvent {
  type: "user_joined" | "user_left";
  room: string;
  user_id: string;
  username: string;
  ts: number;
  /** The token's `info` claim (user_joined only, when the token has one). */
  info?: unknown;
}

export interface TypingEvent {
  type: "typing";
  room: string;
  from: Sender;
}

/** Messages may be missing: reload the view (`room.history()`). Delivery goes on from
 * `offset` + 1 of `epoch`. `reason`: "node" (the node lost them, its `gap` envelope) or
 * "recovery" (a rejoin with `since` got `recovered: false`). */
export interface GapEvent {
  type: "gap";
  room: string;
  recovered: false;
  offset: number;
  epoch: string;
  reason: "node" | "recovery";
}

export interface JoinedEvent {
  room: string;
  offset: number;
  epoch: string;
  /** The join replayed what was missed since the room's position. */
  recovered: boolean;
  /** A rejoin after a reconnect (not the first join). */
  rejoin: boolean;
}

export interface LeftEvent {
  room: string;
  /** "forbidden" (a refresh took the right away), "unsubscribed" (the server API), or the
   * error code that refused a rejoin for good. */
  reason: string;
  error?: ServerError;
}

export interface Member {
  user_id: string;
  username: string;
  node_id: string;
  conn_id: string;
  joined_at: number;
  nick?: string;
  info?: unknown;
}

export interface JoinedReply {
  type: "joined";
  room: string;
  /** Absent when this connection was already in the room. */
  offset?: number;
  epoch?: string;
  recovered?: boolean;
}

export interface Welcome {
  type: "welcome";
  conn_id: string;
  node_id: string;
  user_id: string;
  username: string;
  expires_at?: number;
  anonymous?: true;
}

export type State = "disconnected" | "connecting" | "connected" | "reconnecting" | "closed";

export interface StateDetail {
  /** The close code of the connection (or attempt) that ended. */
  code: number;
  reason: string;
  /** False after a terminal code or `disconnect()`: no more attempts. */
  reconnect: boolean;
  /** Milliseconds until the next attempt (when `reconnect`). */
  delay?: number;
}

/** Error codes of the node (PROTOCOL.md section 4) and of the client itself. */
export type ErrorCode =
  | "bad_request" | "unknown_type" | "unknown_namespace" | "forbidden" | "room_full"
  | "unauthorized" | "token_expired" | "rate_limited" | "too_many_rooms" | "not_joined"
  | "unavailable" | "nick_taken" | "internal"
  | "connection_lost" | "closed" | "timeout" | "queue_full" | "history_unavailable" | "left"
  | "token" | "bad_url";

export class RoomcastError extends Error {
  code: ErrorCode | string;
}

/** The node answered with an `error` envelope. */
export class ServerError extends RoomcastError {
  reply: { type: "error"; code: string; message: string; [field: string]: unknown };
  /** For `rate_limited`: wait this long before resending. */
  retryAfterMs?: number;
}

/** The connection dropped before the reply; for a publish: it may or may not be stored. */
export class ConnectionLostError extends RoomcastError {
  code: "connection_lost";
}

/** The client stopped: `disconnect()` (1000) or a terminal close code. */
export class ClosedError extends RoomcastError {
  code: "closed";
  closeCode: number;
  reason: string;
}

export class HistoryUnavailableError extends RoomcastError {
  code: "history_unavailable";
  /** The room's current position: fetch again without `since`. */
  offset: number;
  epoch: string;
}

export interface Options {
  /** A connection token, sent in the first frame (`--auth jwt`). */
  token?: string;
  /** Returns a fresh token: called when there is none, on `refresh_required`, after 4002. */
  getToken?: () => string | Promise<string>;
  /** Send a `connect` frame without a token (`--auth jwt --allow-anonymous`). */
  anonymous?: boolean;
  /** Backoff base and cap in ms (500, 20000): full jitter, uniform in [0, min(cap, base·2^n)]. */
  backoffBase?: number;
  backoffCap?: number;
  /** A connection that lived this long (5000 ms) starts the backoff over. */
  stableAfter?: number;
  /** Ms for a reply, and for a welcome after the handshake (10000). */
  requestTimeout?: number;
  /** Ping after this many ms without a frame (25000; 0: off); drop after pongTimeout more. */
  pingInterval?: number;
  pongTimeout?: number;
  /** Publishes kept while disconnected (100); one more rejects with `queue_full`. */
  publishQueue?: number;
  /** At most one typing frame per room per this many ms (1500; the node relays one a second). */
  typingInterval?: number;
  /** For tests: the WebSocket class and the random source of the backoff. */
  WebSocket?: { new (url: string): WebSocket };
  random?: () => number;
}

type Unsubscribe = () => void;

export interface RoomEvents {
  message: (message: MessageEnvelope) => void;
  join: (event: UserEvent) => void;
  leave: (event: UserEvent) => void;
  typing: (event: TypingEvent) => void;
  gap: (event: GapEvent) => void;
  joined: (event: JoinedEvent) => void;
  left: (event: LeftEvent) => void;
}

export interface Room {
  readonly client: Roomcast;
  readonly name: string;
  /** The last message delivered (a rejoin resumes after it), or null. */
  readonly position: Position | null;
  /** Joined, or to be joined on the next connection. */
  readonly joined: boolean;
  join(options?: { nick?: string }): Promise<JoinedReply>;
  leave(): Promise<void>;
  /** Resolves once stored; queued (bounded) while disconnected. */
  publish(data: unknown): Promise<Position>;
  presence(): Promise<Member[]>;
  history(options?: { since?: Position; limit?: number }): Promise<MessageEnvelope[]>;
  /** Throttled to one frame per `typingInterval`; returns whether one was sent. */
  typing(): boolean;
  on<E extends keyof RoomEvents>(event: E, handler: RoomEvents[E]): Unsubscribe;
  off<E extends keyof RoomEvents>(event: E, handler: RoomEvents[E]): this;
}

export interface ClientEvents {
  state: (state: State, detail?: StateDetail) => void;
  connected: (welcome: Welcome) => void;
  disconnected: (detail: StateDetail) => void;
  error: (error: RoomcastError) => void;
}

export function shouldReconnect(code: number | null | undefined): boolean;
export function backoffDelay(attempt: number, base?: number, cap?: number,
  random?: () => number): number;

export class Roomcast {
  /** `url`: the node's (or balancer's) `ws(s)://…/ws` endpoint; with `--auth none`, identity
   * as `?user_id=&username=`. */
  constructor(url: string, options?: Options);
  readonly url: string;
  readonly options: Required<Omit<Options, "token" | "getToken" | "WebSocket" | "random">> & Options;
  readonly state: State;
  /** The current connection's welcome (identity, node), null before the first. */
  readonly user: Welcome | null;
  room(name: string, options?: { since?: Position }): Room;
  connect(): Promise<Welcome>;
  disconnect(): void;
  on<E extends keyof ClientEvents>(event: E, handler: ClientEvents[E]): Unsubscribe;
  off<E extends keyof ClientEvents>(event: E, handler: ClientEvents[E]): this;
}
