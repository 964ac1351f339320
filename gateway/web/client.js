// The browser client of the broadcast gateway (wire contract: PROTOCOL.md, version 1).
//
// A dependency-free ES module: `import { Client } from "/client.js"`. A `Client` is one tab's
// view of a connection to the gateway. By default (option `shared`) the tabs of an origin that
// use the same URL share one WebSocket, one session, and one copy of every message:
// - through a SharedWorker (shared-worker.js) where the browser has one;
// - else through a leader tab elected with the Web Locks API, which the other tabs reach over a
//   BroadcastChannel (leader.js); when it closes or crashes, another tab takes the session over
//   from the last positions it saw;
// - else, and with `shared: false`, each tab connects on its own.
// The connection (connection.js: reconnect, resume, heartbeat, publish queue) runs in a hub
// (hub.js) that counts the tabs of each channel and routes between them and the connection. A
// tab keeps its own subscriptions and positions and drops repeated seqs, so it gets every
// message of its channels once and in order, whichever context holds the socket.
// A subscription may ask for the `join` and `leave` frames of a presence channel (`presence`).
// The tab also relays the browser's `online`/`offline` events and a hidden tab becoming visible
// again (a reconnect, or a ping, at once). Types: client.d.ts.

import {
  ClientError,
  CLOSED,
  CONNECTING,
  DEFAULTS,
  defaultUrl,
  Emitter,
  OPEN,
  realClock,
} from "./connection.js";
import { applySubscribed, connectionOptions, holdLock, Hub, tabLockName } from "./hub.js";
import { LeaderTransport } from "./leader.js";

export {
  backoffDelay,
  ClientError,
  CLOSED,
  CONNECTING,
  DEFAULTS,
  OPEN,
  RECONNECTING,
  realClock,
} from "./connection.js";

/** Options of the connection that may cross to a worker (plain values only). */
const PLAIN_OPTIONS = ["url", ...Object.keys(DEFAULTS)];

/** A tab's id: unique among the tabs of a browser. */
function randomId() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === "function") return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** A hub in this tab, for this tab alone. */
class LocalTransport {
  constructor(client, options) {
    this.client = client;
    this.sharing = "none";
    this.ready = true;
    this.local = true;
    this.hub = new Hub(connectionOptions(options), {
      send: (ids, msg) => ids.includes(client.id) && client.receive(msg),
    });
  }

  post(msg) {
    this.hub.receive(this.client.id, msg);
  }
}

/** The hub of a SharedWorker, one per gateway URL, reached over this tab's MessagePort. */
class WorkerTransport {
  constructor(client, options) {
    this.client = client;
    this.sharing = "worker";
    this.ready = false;
    this.local = false;
    /** Whether the worker said anything: then its script loaded. */
    this.answered = false;
    const name = `bgw ${client.url}`;
    // Written out so that bundlers see the worker and emit it next to this module.
    this.worker = options.workerUrl
      ? new SharedWorker(options.workerUrl, { type: "module", name })
      : new SharedWorker(new URL("./shared-worker.js", import.meta.url), { type: "module", name });
    this.port = this.worker.port;
    const clock = options.clock ?? realClock;
    this.port.onmessage = ({ data }) => {
      if (!this.answered) clock.clearTimeout(this.silence);
      this.answered = true;
      if (client.transport === this) client.receive(data);
    };
    // The worker's script did not load (not served next to client.js, say): share otherwise.
    // Browsers report that with an error event, but not always to a second tab that asked for the
    // same worker while it was loading: a worker that says nothing in time counts as failed too.
    const failed = () => {
      if (!this.answered && client.transport === this) client.fallBack();
    };
    this.worker.onerror = failed;
    this.silence = clock.setTimeout(failed, options.openTimeout);
    const attach = () => {
      if (client.transport !== this) return;
      const plain = {};
      for (const key of PLAIN_OPTIONS) if (options[key] !== undefined) plain[key] = options[key];
      plain.url = client.url;
      this.port.postMessage({ op: "attach", tab: client.id, options: plain });
      this.ready = true;
      client.hubChanged();
    };
    const locks = globalThis.navigator?.locks;
    if (locks) {
      // The worker learns that this tab is gone when this lock is released, so the tab holds it
      // before it attaches.
      client.holdTabLock(locks).then(attach);
    } else {
      globalThis.addEventListener?.("pagehide", () => this.post({ op: "detach" }));
      attach();
    }
  }

  post(msg) {
    this.port.postMessage({ ...msg, tab: this.client.id });
  }

  /** Given up on (the tab shares otherwise): a worker that was merely slow lets the tab go. */
  close() {
    this.port.postMessage({ op: "detach", tab: this.client.id });
    this.port.close();
  }
}

/** The way to the hub: the first of a SharedWorker, a leader tab, this tab alone that works. */
function openTransport(client, options) {
  if (options.shared !== false) {
    if (typeof globalThis.SharedWorker === "function" && !client.workerFailed) {
      try {
        return new WorkerTransport(client, options);
      } catch {
        // blocked (a content security policy, a sandboxed frame): share otherwise
      }
    }
    const locks = options.locks ?? globalThis.navigator?.locks;
    const BroadcastChannel = options.BroadcastChannel ?? globalThis.BroadcastChannel;
    if (locks && typeof BroadcastChannel === "function") {
      return new LeaderTransport(client, options, { locks, BroadcastChannel });
    }
  }
  return new LocalTransport(client, options);
}

export class Client extends Emitter {
  constructor(options = {}) {
    super();
    const o = { ...DEFAULTS, shared: true, ...options };
    this.options = o;
    this.url = o.url ?? defaultUrl();
    /** The token, or the callback that gives one before each connection. */
    this.token = o.token;
    /** This tab's name towards the hub. */
    this.id = randomId();

    this.state = CLOSED;
    /** The session of the shared connection, from its last `welcome`. */
    this.session = null;
    /** The node of the shared connection, from its last `welcome`. */
    this.node = null;
    /**
     * Every channel this tab subscribed to: `{seq, epoch, active, presence}`. `seq` is the last
     * seq delivered to this tab (or the start of its subscription), `null` when unknown;
     * `active` once the hub said `subscribed` for this tab; `presence` when it asked for the
     * channel's `join` and `leave`.
     */
    this.channels = new Map();
    /** Requests to the hub, by id, waiting for their reply: `{resolve, reject, posted, msg}`. */
    this.pending = new Map();
    /** Requests made while no hub is reachable yet (a leader is being elected). */
    this.waiting = [];
    this.nextId = 1;
    /** Between `connect()` and `close()`: the hub counts this tab in. */
    this.connected = false;
    /** Set by `close()`: publishes fail until `connect()`. */
    this.stopped = false;
    /** This tab's own Web Lock, once asked for (`holdTabLock`). */
    this.tabLock = null;
    /** Set when the SharedWorker did not start: this tab shares otherwise. */
    this.workerFailed = false;
    this.transport = openTransport(this, o);
    this.listenToBrowser();
  }

  /**
   * Where this tab's connection runs: `worker` (a SharedWorker), `leader` (this tab, for the
   * others too), `follower` (another tab), `none` (this tab alone).
   */
  get sharing() {
    return this.transport.sharing;
  }

  // --- the application's calls --------------------------------------------------------------

  /**
   * Connects: joins the shared connection (which connects, if it does not yet), or connects again
   * after a close, asking the token callback afresh.
   */
  connect() {
    this.stopped = false;
    this.connected = true;
    if (this.state === CLOSED) this.setState(CONNECTING);
    this.transport.start?.();
    if (this.transport.ready) this.transport.post(this.joinMessage());
  }

  /**
   * Closes this tab's client for good: its subscriptions are released, its queued and
   * unanswered requests fail; the connection closes with the last tab.
   */
  close() {
    this.stopped = true;
    this.connected = false;
    this.rejectAll(new ClientError("closed", "the client was closed"));
    if (this.transport.ready) this.transport.post({ op: "leave" });
    this.setState(CLOSED);
  }

  /** Supplies a new token; after a close 4001 the client connects again with it. */
  setToken(token) {
    this.token = token;
    this.postState({ op: "token", token: this.describeToken() });
  }

  /**
   * Subscribes to `channel`, for as long as the client lives (across reconnects). `since`
   * (`{seq, epoch}`) asks for the retained messages after that position; `presence`, for the
   * `join` and `leave` events of a channel that keeps presence.
   */
  subscribe(channel, { since, presence = false } = {}) {
    if (this.channels.has(channel)) return;
    const sub = {
      seq: since?.seq ?? null,
      epoch: since?.epoch ?? null,
      active: false,
      presence: !!presence,
    };
    this.channels.set(channel, sub);
    this.postState({ op: "subscribe", channel, since: position(sub), presence: sub.presence });
  }

  unsubscribe(channel) {
    if (!this.channels.delete(channel)) return;
    this.postState({ op: "unsubscribe", channel });
  }

  /** The last delivered position of every channel: `{channel: {seq, epoch}}`. */
  positions() {
    const out = {};
    for (const [channel, sub] of this.channels) {
      const at = position(sub);
      if (at) out[channel] = at;
    }
    return out;
  }

  /**
   * Publishes `data` (any JSON value) to `channel`; resolves with `{channel, seq}` when the
   * server confirms it. Queued while the connection is not OPEN or the socket's buffer is full; a
   * publish written to a connection that is lost before its reply fails with
   * `connection_lost` (it may or may not have been published) and is not sent again.
   */
  publish(channel, data) {
    if (this.stopped) {
      return Promise.reject(new ClientError("closed", "the client was closed"));
    }
    return this.request({ op: "publish", channel, data });
  }

  /** Sends a new token on the open connection (before the old one expires); also keeps it. */
  refresh(token) {
    this.token = token;
    if (this.state !== OPEN) {
      this.postState({ op: "token", token: this.describeToken() });
      return Promise.resolve({ expires: null });
    }
    return this.request({ op: "refresh", token });
  }

  // --- towards the hub ----------------------------------------------------------------------

  /** This tab's whole state, for a hub that does not know it yet (or to connect). */
  joinMessage() {
    const channels = {};
    const presence = [];
    for (const [channel, sub] of this.channels) {
      channels[channel] = position(sub);
      if (sub.presence) presence.push(channel);
    }
    const offline = globalThis.navigator?.onLine === false;
    return { op: "join", channels, presence, token: this.describeToken(), offline };
  }

  /** Tells the hub a change of this tab's state; a hub reached later gets it in `join`. */
  postState(msg) {
    if (this.connected && this.transport.ready) this.transport.post(msg);
  }

  describeToken() {
    const token = this.token;
    const local = this.transport?.local ?? false;
    if (token === undefined || token === null) return { kind: "none" };
    if (typeof token !== "function") return { kind: "value", value: token, local };
    return local ? { kind: "callback", call: token, local } : { kind: "callback" };
  }

  request(msg) {
    if (!this.transport.ready && this.waiting.length >= this.options.maxQueue) {
      return Promise.reject(
        new ClientError("queue_full", `more than ${this.options.maxQueue} frames queued`),
      );
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, posted: false, msg: { ...msg, id } };
      this.pending.set(id, entry);
      if (this.transport.ready) this.postRequest(entry);
      else this.waiting.push(entry);
    });
  }

  postRequest(entry) {
    entry.posted = true;
    this.transport.post(entry.msg);
  }

  /**
   * A hub became reachable, or another one took over (the leader tab is gone): what was asked
   * of the old one is lost, and the new one learns this tab's state.
   */
  hubChanged() {
    for (const [id, entry] of this.pending) {
      if (!entry.posted) continue;
      this.pending.delete(id);
      entry.reject(new ClientError("connection_lost", "the connection was lost before the reply"));
    }
    if (this.connected) this.transport.post(this.joinMessage());
    const waiting = this.waiting;
    this.waiting = [];
    for (const entry of waiting) this.postRequest(entry);
  }

  /**
   * Holds this tab's Web Lock for the life of the page: whoever else is granted it knows the tab
   * is gone. Once, whichever way of sharing asks for it.
   */
  holdTabLock(locks) {
    this.tabLock ??= holdLock(locks, tabLockName(this.id));
    return this.tabLock;
  }

  /** The SharedWorker could not start: share through a leader tab, or connect alone. */
  fallBack() {
    this.workerFailed = true;
    this.transport.close();
    this.transport = openTransport(this, this.options);
    if (this.connected) this.transport.start?.();
    if (this.transport.ready) this.hubChanged();
  }

  rejectAll(error) {
    this.waiting = [];
    for (const entry of this.pending.values()) entry.reject(error);
    this.pending.clear();
  }

  /** The browser's network and visibility changes, relayed to the hub. */
  listenToBrowser() {
    const relay = (op) => () => this.postState({ op });
    globalThis.window?.addEventListener?.("online", relay("online"));
    globalThis.window?.addEventListener?.("offline", relay("offline"));
    const document = globalThis.document;
    document?.addEventListener?.("visibilitychange", () => {
      if (document.visibilityState === "visible") this.postState({ op: "check" });
    });
  }

  // --- from the hub -------------------------------------------------------------------------

  receive(msg) {
    switch (msg.type) {
      case "reply":
        return this.settle(msg);
      case "token":
        return this.giveToken(msg.req);
      case "event":
        return this.connected ? this.event(msg.name, msg.event) : undefined;
      default:
        return undefined;
    }
  }

  event(name, event) {
    switch (name) {
      case "state":
        return this.setState(event.state);
      case "welcome":
        this.session = event.session;
        this.node = event.node;
        return this.emit("welcome", event);
      case "reconnect":
      case "unsubscribed":
        return this.emit(name, event);
      case "subscribed":
        return this.subscribed(event);
      case "message":
        return this.message(event);
      case "join":
      case "leave":
        return this.channels.get(event.channel)?.presence ? this.emit(name, event) : undefined;
      case "error": {
        const { code, message, ...details } = event;
        // A refused subscription: it is the application's to ask again.
        if (details.channel !== undefined) this.channels.delete(details.channel);
        return this.emit("error", new ClientError(code, message, details));
      }
      default:
        return undefined;
    }
  }

  subscribed(event) {
    const sub = this.channels.get(event.channel);
    if (!sub) return;
    const recovered = applySubscribed(sub, event);
    const { channel, seq, epoch, resumed } = event;
    this.emit("subscribed", { channel, seq, epoch, recovered, resumed });
  }

  message(event) {
    const sub = this.channels.get(event.channel);
    // Unsubscribed, not yet subscribed for this tab, or a repeat (a replay after a takeover).
    if (!sub?.active || (sub.seq !== null && event.seq <= sub.seq)) return;
    sub.seq = event.seq;
    this.emit("message", event);
  }

  settle({ id, value, error }) {
    const entry = this.pending.get(id);
    if (!entry) return;
    this.pending.delete(id);
    if (error === undefined) entry.resolve(value);
    else {
      const { code, message, ...details } = error;
      entry.reject(new ClientError(code, message, details));
    }
  }

  /** The hub asks this tab for the token of the next connection. */
  giveToken(req) {
    const token = this.token;
    Promise.resolve()
      .then(() => (typeof token === "function" ? token() : token))
      .then(
        (value) => this.transport.post({ op: "tokenReply", req, token: value ?? null }),
        (e) => this.transport.post({ op: "tokenReply", req, error: String(e?.message ?? e) }),
      );
  }
}

/** A subscription's position as the wire carries it, or null when it has none. */
function position({ seq, epoch }) {
  if (seq === null) return null;
  return epoch === null ? { seq } : { seq, epoch };
}
