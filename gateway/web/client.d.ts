// Types of client.js, the browser client of the broadcast gateway (PROTOCOL.md, version 1).

export type State = "CONNECTING" | "OPEN" | "RECONNECTING" | "CLOSED";
export const CONNECTING: "CONNECTING";
export const OPEN: "OPEN";
export const RECONNECTING: "RECONNECTING";
export const CLOSED: "CLOSED";

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a channel's sequence. */
export interface Position {
  seq: number;
  epoch?: string;
}

/** The timers the client uses; tests pass a fake one. */
export interface Clock {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
}

/** The part of the browser's WebSocket the client uses. */
export interface SocketLike {
  readonly bufferedAmount: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}

/** Where a tab's connection runs; see `Client.sharing`. */
export type Sharing = "worker" | "leader" | "follower" | "none";

/** The part of the Web Locks API the client uses (`navigator.locks`). */
export interface LockManagerLike {
  request(name: string, callback: (lock: unknown) => unknown): Promise<unknown>;
}

export interface Options {
  /** The gateway's WebSocket URL. Default: `/ws` on the page's own server (ws: or wss:). */
  url?: string;
  /**
   * Share one WebSocket (one session, one copy of each message) between the tabs of this origin
   * that use the same `url`: through a SharedWorker where the browser has one, else through a
   * leader tab elected with Web Locks that the other tabs reach over a BroadcastChannel, else
   * (and with `false`) a connection per tab. Default `true`.
   *
   * The shared connection uses the options of the context that runs it (the worker: those of
   * the first tab that attached; the leader: its own), and the token of the leader tab, else of
   * the tab that supplied one last.
   */
  shared?: boolean;
  /**
   * URL of `shared-worker.js`. Default: next to this module (a bundler that knows
   * `new SharedWorker(new URL(..., import.meta.url))` emits it there). When it fails to load,
   * the tabs share through a leader tab instead.
   */
  workerUrl?: string | URL;
  /**
   * The token sent in `hello`, or a callback asked before every connection (it may return a
   * promise). Default: none (the gateway may still take a cookie).
   */
  token?: string | null | (() => string | null | undefined | Promise<string | null | undefined>);
  /** Subprotocols offered. Default `["bgw.v1"]`. */
  protocols?: string[];
  /** First reconnect delay, ms; doubles on every failed attempt. Default 1000. */
  minDelay?: number;
  /** Cap of the reconnect delay, ms (before the jitter). Default 30000. */
  maxDelay?: number;
  /** Failed reconnects in a row before the client gives up (`reconnect_failed`). Default 10. */
  maxAttempts?: number;
  /** After a close 1001 (a draining node), the reconnect waits random() * this, ms. Default 500. */
  drainJitter?: number;
  /** A `ping` without a `pong` within this many ms drops the connection. Default 10000. */
  pongTimeout?: number;
  /** An attempt without `welcome` within this many ms is dropped. Default 10000. */
  openTimeout?: number;
  /** Publishes that may wait for a connection or a drained buffer. Default 1024. */
  maxQueue?: number;
  /** Publishing pauses while the socket's bufferedAmount is above this many bytes. Default 1 MiB. */
  highWaterMark?: number;
  /** How often a paused queue looks at bufferedAmount again, ms. Default 50. */
  pollInterval?: number;
  /**
   * After a leader tab is gone, how long its successor keeps the channels of the session that no
   * tab has claimed again yet, ms. Default 5000.
   */
  handoverGrace?: number;
  /** Default: the global timers. */
  clock?: Clock;
  /** A number in [0, 1). Default: `Math.random`. */
  random?: () => number;
  /** Default: the global `WebSocket`. */
  WebSocket?: new (url: string, protocols?: string[]) => SocketLike;
  /** For the leader tab's election. Default: `navigator.locks`. */
  locks?: LockManagerLike;
  /** For followers to reach the leader tab. Default: the global `BroadcastChannel`. */
  BroadcastChannel?: new (name: string) => {
    onmessage: ((event: { data: any }) => void) | null;
    postMessage(message: unknown): void;
  };
}

export const DEFAULTS: Readonly<
  Required<
    Omit<
      Options,
      | "url"
      | "token"
      | "clock"
      | "random"
      | "WebSocket"
      | "shared"
      | "workerUrl"
      | "locks"
      | "BroadcastChannel"
    >
  >
>;
export const realClock: Clock;

/** `min(maxDelay, minDelay * 2^attempt) * (0.5 + random())`. */
export function backoffDelay(
  attempt: number,
  random?: () => number,
  options?: { minDelay: number; maxDelay: number },
): number;

export type ErrorCode =
  | "unauthorized" // close 4001: call setToken() (or connect()) to go on
  | "taken_over" // close 4009: another connection resumed the session; the client stops
  | "reconnect_failed" // maxAttempts reconnects failed in a row; the client stops
  | "token" // the token callback threw or rejected; the client retries after the backoff
  | "socket" // the WebSocket constructor threw
  | "server" // an `error` frame: `status` is its code (400, 401, 403, 404, 413, 429, 503)
  | "bad_frame" // the server sent something that is not JSON
  | "queue_full" // publish: maxQueue frames already wait
  | "connection_lost" // publish: the connection (or the leader tab that held it) was lost before the reply
  | "closed"; // publish: the client was closed

export class ClientError extends Error {
  code: ErrorCode;
  /** For `server` errors: the error code of the frame. */
  status?: number;
  /** For a refused subscription: its channel (the client forgets it). */
  channel?: string;
  /** For errors caused by a close: its code and reason. */
  closeCode?: number | null;
  reason?: string;
}

/** A `join` or `leave` of a presence channel. */
export interface Presence {
  channel: string;
  user: string;
  client: string;
  count: number;
}

export interface Events {
  state: { state: State; previous: State };
  welcome: { session: string; node: string; resumed: boolean; heartbeat: number };
  /**
   * A subscription started, or restarted after a reconnect (`resumed` when the session was
   * resumed). `recovered: false` means messages were lost: delivery goes on after `seq`. A tab
   * that subscribes, with `since`, to a channel another tab already holds gets the messages after
   * `since` when they are of the shared connection's epoch (it subscribes again from there), and
   * `recovered: false` when they are of another.
   */
  subscribed: { channel: string; seq: number; epoch: string; recovered: boolean; resumed: boolean };
  unsubscribed: { channel: string };
  /** Each message once, in seq order per channel. */
  message: { channel: string; seq: number; data: Json };
  /**
   * A member joined a channel subscribed with `presence` (PROTOCOL.md, section 14): `user` is
   * its token's `sub` ("" when anonymous), `client` its connection (the same in its `leave`),
   * `count` the channel's members now. Not sent above the server's
   * `--presence-max-join-leave`; the one that crosses it is.
   */
  join: Presence;
  /** A member left a channel subscribed with `presence`. */
  leave: Presence;
  /**
   * A reconnect is scheduled after `delay` ms; `code` is the close code that caused it, if any
   * (none, and delay 0, when the browser came back online).
   */
  reconnect: { delay: number; attempt: number; code: number | null; reason: string };
  error: ClientError | Error;
}

/** Each tab is a `Client`; by default the tabs of an origin share its connection (`shared`). */
export class Client {
  constructor(options?: Options);
  /** The shared connection's state, while this tab is connected; CLOSED after `close()`. */
  readonly state: State;
  /** The session of the last `welcome`, resumed on reconnect. */
  readonly session: string | null;
  /** The node of the current connection. */
  readonly node: string | null;
  /**
   * Where the connection runs: `worker` (a SharedWorker), `leader` (this tab, for the other tabs
   * too), `follower` (another tab), `none` (this tab, for itself).
   */
  readonly sharing: Sharing;
  on<K extends keyof Events>(type: K, fn: (event: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, fn: (event: Events[K]) => void): void;
  /**
   * Connects: joins the shared connection, which connects if it is not connected or connecting
   * (asking the token afresh).
   */
  connect(): void;
  /**
   * Closes this tab's client for good: its subscriptions are released, its queued and unanswered
   * publishes fail with `closed`; the connection closes with the last tab.
   */
  close(): void;
  /** A new token; after a close 4001 the client reconnects with it. */
  setToken(token: Options["token"]): void;
  /**
   * Subscribes for the client's lifetime (across reconnects), from `since` when given; with
   * `presence`, the channel's `join` and `leave` events too (the channel must keep presence on
   * the server, else the subscription is refused with a `server` error of status 400).
   */
  subscribe(channel: string, options?: { since?: Position; presence?: boolean }): void;
  unsubscribe(channel: string): void;
  /** The last delivered position of every channel. */
  positions(): Record<string, Position>;
  /** Resolves when the server confirms the publish. */
  publish(channel: string, data: Json): Promise<{ channel: string; seq: number }>;
  /**
   * Sends a new token on the open connection, before the old one expires, and keeps it for the
   * next `hello`. When not OPEN it is only kept, and resolves with `expires: null`.
   */
  refresh(token: string): Promise<{ expires: number | null }>;
}
