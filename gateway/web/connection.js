// One connection to the gateway (wire contract: PROTOCOL.md, version 1): the state machine that
// client.js runs in a tab, in a shared worker, or in the tab elected to connect for the others
// (hub.js routes between it and the tabs). It keeps one WebSocket to the gateway's `/ws` and hides
// its losses:
// - reconnects with exponential backoff (1 s, 2 s, 4 s ... capped at 30 s, each delay multiplied
//   by 0.5 + random), at most `maxAttempts` times in a row before it gives up with an error;
//   after a close 1001 (a draining node) it reconnects at once, with a small jitter; attempts
//   made while the browser reports itself offline are not counted, and `online` after `offline`
//   reconnects at once;
// - asks the token callback again before every connection, and after a close 4001 stops until
//   the application supplies a new token or connects again;
// - resumes: sends its session id and the last seq and epoch of every channel in `hello`,
//   resubscribes from those positions when the session is gone, drops repeated seqs and tells
//   the application when messages were lost (`subscribed` with `recovered: false`);
// - sends `ping` every heartbeat interval of `welcome`, and when asked to check the connection
//   (a hidden tab became visible); no `pong` within `pongTimeout` means the connection is dead:
//   it is dropped and replaced;
// - queues publishes (bounded) until `welcome`, and holds them while the socket's
//   `bufferedAmount` is above `highWaterMark`;
// - asks for the `join` and `leave` frames of a presence channel where subscribed with
//   `presence` (the session keeps that across a resume), and passes them on.
// The clock, the random source and the WebSocket constructor are options, so that tests fake
// them. Types: client.d.ts.

export const CONNECTING = "CONNECTING";
export const OPEN = "OPEN";
export const RECONNECTING = "RECONNECTING";
export const CLOSED = "CLOSED";

/** The defaults of every tunable option; each is documented in client.d.ts. */
export const DEFAULTS = Object.freeze({
  protocols: ["bgw.v1"],
  minDelay: 1000,
  maxDelay: 30000,
  maxAttempts: 10,
  drainJitter: 500,
  pongTimeout: 10000,
  openTimeout: 10000,
  maxQueue: 1024,
  highWaterMark: 1024 * 1024,
  pollInterval: 50,
  handoverGrace: 5000,
});

/** The real clock: the global timers. */
export const realClock = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (id) => globalThis.clearTimeout(id),
};

/**
 * The delay before reconnect attempt `attempt` (0 for the first): `minDelay * 2^attempt`, capped
 * at `maxDelay`, multiplied by `0.5 + random()`.
 */
export function backoffDelay(attempt, random = Math.random, options = DEFAULTS) {
  const base = Math.min(options.maxDelay, options.minDelay * 2 ** attempt);
  return base * (0.5 + random());
}

/** An error the client reports; `code` says what went wrong (see client.d.ts). */
export class ClientError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = "ClientError";
    this.code = code;
    Object.assign(this, details);
  }
}

/** The URL of `/ws` on the server that served the page (`ws:` or `wss:` after its scheme). */
export function defaultUrl() {
  const location = globalThis.location;
  if (!location) {
    throw new ClientError("no_url", "no `url` option and no page location to derive it from");
  }
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/**
 * Events by type, and the state whose changes are one (`state`): what a `Connection` and a
 * `Client` both offer their listeners.
 */
export class Emitter {
  constructor() {
    this.listeners = new Map();
  }

  /** Calls `fn(event)` for every event of `type`; returns a function that stops it. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  emit(type, event) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) {
      try {
        fn(event);
      } catch (e) {
        // A failing listener must not break its emitter; report it where it can be seen.
        if (type !== "error") this.emit("error", e);
        else globalThis.console?.error(e);
      }
    }
  }

  setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this.emit("state", { state, previous });
  }
}

export class Connection extends Emitter {
  constructor(options = {}) {
    super();
    const o = { ...DEFAULTS, ...options };
    this.options = o;
    this.url = o.url ?? defaultUrl();
    this.clock = o.clock ?? realClock;
    this.random = o.random ?? Math.random;
    this.WebSocket = o.WebSocket ?? globalThis.WebSocket;
    /** The token, or the callback that gives one before each connection. */
    this.token = o.token;

    this.state = CLOSED;
    /** The session to resume, from the last `welcome`. */
    this.session = null;
    /** The node of the current connection, from its `welcome`. */
    this.node = null;
    /**
     * Every channel subscribed to: `{seq, epoch, confirmed, presence}`. `seq` is the last seq
     * delivered (or the start of the subscription), `null` when unknown; `confirmed` once the
     * current connection said `subscribed` (or restored it), since only then does `seq` say where
     * its delivery goes on; `presence` when its `join` and `leave` frames were asked for.
     */
    this.channels = new Map();
    /** Publishes not yet written to a socket: `{id, text}`. */
    this.queue = [];
    /** Requests sent or queued, by id, waiting for their reply: `{resolve, reject, sent}`. */
    this.pending = new Map();
    this.nextId = 1;
    /** Consecutive connection attempts that did not reach `welcome`. */
    this.attempts = 0;
    /** Set by `close()` and by giving up: no more connections until `connect()`. */
    this.stopped = false;
    /** The current socket; each socket's handlers check that it is still the current one. */
    this.ws = null;
    /** Counts connection attempts, so that a token that comes after a newer attempt is dropped. */
    this.generation = 0;
    /** Whether the current socket got its `welcome`. */
    this.welcomed = false;
    /** Whether the server closed with 4001: no reconnect until a new token. */
    this.unauthorized = false;
    /** Whether the browser said `offline` (and not `online` since): failures then are expected. */
    this.offline = false;
    /** Subscribe and unsubscribe requests on the current socket, by id: `{kind, channel}`. */
    this.requests = new Map();
    /** The positions the last `hello` carried. */
    this.helloSince = {};
    this.timers = {};
  }

  fail(code, message, details) {
    this.emit("error", new ClientError(code, message, details));
  }

  // --- the calls of its users ---------------------------------------------------------------

  /** Connects (again), asking the token callback afresh. */
  connect() {
    this.stopped = false;
    this.attempts = 0;
    this.clearTimer("reconnect");
    this.drop(1000, "reconnecting");
    this.setState(CONNECTING);
    this.open();
  }

  /** Closes the connection for good: no reconnect, queued and unanswered requests fail. */
  close() {
    this.stopped = true;
    this.clearTimer("reconnect");
    this.drop(1000, "client closed");
    this.rejectAll(new ClientError("closed", "the client was closed"));
    this.setState(CLOSED);
  }

  /** The token changed: after a close 4001, connect again with it. */
  tokenChanged() {
    if (this.state === CLOSED && this.unauthorized && !this.stopped) this.connect();
  }

  /**
   * Starts from a session and positions known elsewhere (a tab that connected for the others
   * and is gone): the next `hello` resumes them.
   */
  restore(session, positions) {
    this.session = session;
    for (const [channel, { seq, epoch }] of Object.entries(positions)) {
      this.channels.set(channel, { seq, epoch, confirmed: false, presence: false });
    }
  }

  /**
   * Subscribes to `channel`, for as long as the connection lives (across reconnects). `since`
   * (`{seq, epoch}`) asks for the retained messages after that position; `presence`, for the
   * channel's `join` and `leave` frames (a channel that keeps presence).
   */
  subscribe(channel, { since, presence = false } = {}) {
    if (this.channels.has(channel)) return;
    const seq = since?.seq ?? null;
    const sub = { seq, epoch: since?.epoch ?? null, confirmed: false, presence: !!presence };
    this.channels.set(channel, sub);
    if (this.state === OPEN) this.sendSubscribe(channel);
  }

  /**
   * A channel held without its presence frames is wanted with them (another tab asks): it is
   * subscribed again, with them, from where its delivery is.
   */
  askPresence(channel) {
    const sub = this.channels.get(channel);
    if (!sub || sub.presence) return undefined;
    sub.presence = true;
    if (sub.seq !== null) return this.rewind(channel, { seq: sub.seq, epoch: sub.epoch ?? undefined });
    if (this.state !== OPEN) return undefined; // the next `hello` or `welcome` takes it
    for (const request of this.requests.values()) {
      if (request.kind === "subscribe" && request.channel === channel) request.stale = true;
    }
    this.sendRequest("unsubscribe", channel);
    return this.sendSubscribe(channel);
  }

  /**
   * Delivery of `channel` must go on from `since`, behind where it is (a tab that joins with an
   * older position): subscribed again from there, it replays from there. Whoever had the
   * messages already drops them by seq.
   */
  rewind(channel, since) {
    const sub = this.channels.get(channel);
    if (!sub) return this.subscribe(channel, { since });
    sub.seq = since.seq;
    sub.epoch = since.epoch ?? sub.epoch; // the same sequence (a tab's `since` may omit it)
    sub.confirmed = false; // what comes before the new `subscribed` is from the old start
    if (this.state !== OPEN) return undefined; // the next `hello` or `welcome` takes it
    for (const request of this.requests.values()) {
      if (request.kind === "subscribe" && request.channel === channel) request.stale = true;
    }
    this.sendRequest("unsubscribe", channel);
    return this.sendSubscribe(channel);
  }

  unsubscribe(channel) {
    if (!this.channels.delete(channel)) return;
    // Also when the subscribe is still unanswered: the server takes frames in order.
    if (this.state === OPEN) this.sendRequest("unsubscribe", channel);
  }

  /** The last delivered position of every channel: `{channel: {seq, epoch}}`. */
  positions() {
    const out = {};
    for (const [channel, { seq, epoch }] of this.channels) {
      if (seq !== null) out[channel] = epoch === null ? { seq } : { seq, epoch };
    }
    return out;
  }

  /**
   * Publishes `data` (any JSON value) to `channel`; resolves with `{channel, seq}` when the
   * server confirms it. Queued while the connection is not OPEN or the socket's buffer is full;
   * a publish written to a connection that is lost before its reply fails with
   * `connection_lost` (it may or may not have been published) and is not sent again.
   */
  publish(channel, data) {
    if (this.stopped) {
      return Promise.reject(new ClientError("closed", "the client was closed"));
    }
    if (this.queue.length >= this.options.maxQueue) {
      return Promise.reject(
        new ClientError("queue_full", `more than ${this.options.maxQueue} frames queued`),
      );
    }
    const id = this.nextId++;
    const text = JSON.stringify({ type: "publish", id, channel, data });
    const reply = new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, sent: false });
    });
    this.queue.push({ id, text });
    this.flush();
    return reply;
  }

  /** Sends a new token on the open connection, before the old one expires. */
  refresh(token) {
    if (this.state !== OPEN) return Promise.resolve({ expires: null });
    return this.request({ type: "refresh", token });
  }

  /**
   * Checks the connection now rather than at the next heartbeat or reconnect: a tab hidden for
   * a while had its timers throttled, and its socket may have died meanwhile.
   */
  check() {
    if (this.state === OPEN) this.ping();
    else if (this.state === RECONNECTING && this.timers.reconnect !== undefined) {
      this.clearTimer("reconnect");
      this.open();
    }
  }

  /** The browser reports the network gone: attempts that fail meanwhile are not counted. */
  wentOffline() {
    this.offline = true;
  }

  /**
   * The browser reports the network back after `offline`: reconnect at once, without waiting for
   * a backoff or for a dead socket's heartbeat (a socket that lived through a change of network
   * is often dead without knowing it); the session resumes.
   */
  cameOnline() {
    if (!this.offline) return;
    this.offline = false;
    if (this.state === CLOSED) return;
    this.attempts = 0;
    this.clearTimer("reconnect");
    this.drop(1000, "network changed");
    this.schedule(0, null, "the network is back");
  }

  // --- the connection -----------------------------------------------------------------------

  async open() {
    const generation = ++this.generation;
    let token = this.token;
    try {
      if (typeof token === "function") {
        token = token();
        if (token && typeof token.then === "function") {
          token = await token;
          if (generation !== this.generation) return; // connect() or close() came meanwhile
        }
      }
    } catch (e) {
      if (generation !== this.generation) return;
      this.fail("token", `the token callback failed: ${e?.message ?? e}`, { cause: e });
      return this.lost(null, "token callback failed");
    }
    let ws;
    try {
      ws = new this.WebSocket(this.url, this.options.protocols);
    } catch (e) {
      this.fail("socket", `cannot open a WebSocket: ${e?.message ?? e}`, { cause: e });
      return this.lost(null, "cannot open a WebSocket");
    }
    this.ws = ws;
    this.welcomed = false;
    this.unauthorized = false;
    const current = () => this.ws === ws;
    ws.onopen = () => current() && this.hello(token);
    ws.onmessage = (event) => current() && this.receive(event.data);
    ws.onclose = (event) => current() && this.closed(event.code, event.reason);
    ws.onerror = () => {}; // a close event follows, with its code
    this.setTimer("open", this.options.openTimeout, () => {
      this.drop(1000, "no welcome in time");
      this.lost(null, "no welcome in time");
    });
  }

  hello(token) {
    const frame = { type: "hello" };
    if (token !== undefined && token !== null) frame.token = token;
    this.helloSince = {};
    if (this.session) {
      frame.session = this.session;
      frame.since = this.helloSince = this.positions();
    }
    this.send(frame);
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return this.fail("bad_frame", "the server sent a frame that is not JSON");
    }
    switch (frame.type) {
      case "welcome":
        return this.welcome(frame);
      case "subscribed": {
        const request = this.requests.get(frame.id);
        this.requests.delete(frame.id);
        if (request?.stale) return undefined; // a subscription asked again since (`rewind`)
        return this.subscribed(frame.channel, frame, false);
      }
      case "message":
        return this.message(frame);
      case "join":
      case "leave":
        return this.presence(frame);
      case "pong":
        return this.clearTimer("pong");
      case "unsubscribed":
        this.requests.delete(frame.id);
        return this.emit("unsubscribed", { channel: frame.channel });
      case "published":
      case "refreshed":
        return this.settle(frame.id, (p) => p.resolve(reply(frame)));
      case "error":
        return this.serverError(frame);
      default:
        // Unknown types are ignored, like unknown fields: a newer server may add some.
        return undefined;
    }
  }

  welcome(frame) {
    this.clearTimer("open");
    this.welcomed = true;
    this.attempts = 0;
    this.session = frame.session;
    this.node = frame.node;
    const restored = (frame.resumed && frame.channels) || {};
    this.emit("welcome", {
      session: frame.session,
      node: frame.node,
      resumed: frame.resumed,
      heartbeat: frame.heartbeat,
    });
    const again = new Set();
    for (const [channel, position] of Object.entries(restored)) {
      const sub = this.channels.get(channel);
      const sent = this.helloSince[channel];
      if (!sub) {
        this.sendRequest("unsubscribe", channel); // unsubscribed while away
      } else if (sub.seq !== null && (sent?.seq !== sub.seq || (sent.epoch ?? null) !== sub.epoch)) {
        // Subscribed, or rewound, from a position after `hello` went out (a tab that joined a
        // new leader): the restored subscription replays from another position. Subscribed
        // again, it replays from this one.
        this.sendRequest("unsubscribe", channel);
        again.add(channel);
      } else {
        this.subscribed(channel, position, true);
      }
    }
    for (const channel of this.channels.keys()) {
      if (!(channel in restored) || again.has(channel)) this.sendSubscribe(channel);
    }
    this.setState(OPEN);
    this.heartbeat(frame.heartbeat);
    this.flush();
  }

  /** A subscription (re)started at `position` (`{seq, epoch, recovered}`). */
  subscribed(channel, position, resumed) {
    const sub = this.channels.get(channel);
    if (!sub) return;
    // The server replays what follows the position the client asked for, when it could
    // (recovered); otherwise delivery goes on after the channel's current seq. A subscribe
    // without a position starts there too; a session restored without one (the subscribe's
    // reply was lost) replays from the position the gateway stored, which the client lacks.
    if (!position.recovered || (sub.seq === null && !resumed)) sub.seq = position.seq;
    sub.epoch = position.epoch;
    sub.confirmed = true;
    this.emit("subscribed", {
      channel,
      seq: position.seq,
      epoch: position.epoch,
      recovered: position.recovered,
      resumed,
    });
  }

  message({ channel, seq, data }) {
    const sub = this.channels.get(channel);
    // Unsubscribed, subscribed again and not yet answered (see `welcome`), or a repeat.
    if (!sub?.confirmed || (sub.seq !== null && seq <= sub.seq)) return;
    sub.seq = seq;
    this.emit("message", { channel, seq, data });
  }

  /** A member joined or left a channel subscribed with `presence`. */
  presence({ type, channel, user, client, count }) {
    if (!this.channels.get(channel)?.presence) return;
    this.emit(type, { channel, user, client, count });
  }

  serverError(frame) {
    const error = new ClientError("server", frame.message, { status: frame.code, id: frame.id });
    if (this.pending.has(frame.id)) return this.settle(frame.id, (p) => p.reject(error));
    const request = this.requests.get(frame.id);
    this.requests.delete(frame.id);
    if (request?.stale) return;
    if (request?.kind === "unsubscribe" && frame.code === 404) return; // it was refused anyway
    if (request?.kind === "subscribe") {
      // The subscription was refused: it is the application's to ask again.
      this.channels.delete(request.channel);
      error.channel = request.channel;
    }
    this.emit("error", error);
  }

  sendSubscribe(channel) {
    const { seq, epoch, presence } = this.channels.get(channel);
    const since = seq === null ? undefined : epoch === null ? { seq } : { seq, epoch };
    this.sendRequest("subscribe", channel, since, presence);
  }

  sendRequest(kind, channel, since, presence) {
    const id = this.nextId++;
    this.requests.set(id, { kind, channel });
    const frame = { type: kind, id, channel };
    if (since) frame.since = since;
    if (presence) frame.presence = true;
    this.send(frame);
  }

  request(frame) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, sent: true });
      this.send({ ...frame, id });
    });
  }

  settle(id, how) {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    how(p);
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  /** Writes queued publishes while the socket's buffer is below the high-water mark. */
  flush() {
    this.clearTimer("flush");
    if (this.state !== OPEN) return;
    while (this.queue.length > 0) {
      if (this.ws.bufferedAmount > this.options.highWaterMark) {
        // Browsers have no drain event: look again shortly.
        this.setTimer("flush", this.options.pollInterval, () => this.flush());
        return;
      }
      const { id, text } = this.queue.shift();
      const p = this.pending.get(id);
      if (p) p.sent = true;
      this.ws.send(text);
    }
  }

  /** Pings every `seconds`. */
  heartbeat(seconds) {
    if (!(seconds > 0)) return;
    this.setTimer("ping", seconds * 1000, () => {
      this.ping();
      this.heartbeat(seconds);
    });
  }

  /** Sends a `ping`; without a `pong` within `pongTimeout`, the connection is dropped. */
  ping() {
    this.send({ type: "ping" });
    if (this.timers.pong) return;
    this.setTimer("pong", this.options.pongTimeout, () => {
      this.drop(1000, "no pong");
      this.lost(null, "no pong in time");
    });
  }

  closed(code, reason) {
    const welcomed = this.welcomed;
    this.drop();
    if (code === 4001) {
      this.unauthorized = true;
      this.attempts = 0;
      this.setState(CLOSED);
      return this.fail("unauthorized", "the server refused the token (4001): supply a new one", {
        closeCode: code,
        reason,
      });
    }
    if (code === 4009) {
      this.stopped = true;
      this.rejectAll(new ClientError("closed", "the session was taken over"));
      this.setState(CLOSED);
      return this.fail("taken_over", "another connection resumed this session (4009)", {
        closeCode: code,
        reason,
      });
    }
    if (code === 1001 && welcomed) {
      // The node drains: another one takes the session over now.
      return this.schedule(this.random() * this.options.drainJitter, code, reason);
    }
    this.lost(code, reason);
  }

  /** The connection (or an attempt at one) is gone: try again after the backoff. */
  lost(code, reason) {
    if (this.stopped) return;
    // Offline, failures say nothing about the gateway: keep trying (the backoff still grows)
    // until `online` reconnects at once.
    if (this.attempts >= this.options.maxAttempts && !this.offline) {
      this.stopped = true;
      this.rejectAll(new ClientError("closed", "the client gave up reconnecting"));
      this.setState(CLOSED);
      return this.fail("reconnect_failed", `no connection after ${this.attempts} attempts`, {
        closeCode: code,
        reason,
      });
    }
    const delay = backoffDelay(this.attempts, this.random, this.options);
    this.attempts += 1;
    this.schedule(delay, code, reason);
  }

  schedule(delay, code, reason) {
    this.setState(RECONNECTING);
    this.emit("reconnect", { delay, attempt: this.attempts, code, reason });
    this.setTimer("reconnect", delay, () => this.open());
  }

  /**
   * Lets go of the current socket: its timers stop, its handlers are ignored from now on, and
   * replies it still owed fail. With a code, the socket is closed too (a dead socket may take
   * long to report its close, so the client never waits for it).
   */
  drop(code, reason) {
    const ws = this.ws;
    this.ws = null;
    this.generation += 1;
    this.welcomed = false;
    for (const name of ["open", "ping", "pong", "flush"]) this.clearTimer(name);
    this.requests.clear();
    for (const sub of this.channels.values()) sub.confirmed = false;
    for (const [id, p] of this.pending) {
      if (p.sent) {
        this.pending.delete(id);
        p.reject(new ClientError("connection_lost", "the connection was lost before the reply"));
      }
    }
    if (code !== undefined && ws && typeof ws.close === "function") {
      try {
        ws.close(code, reason);
      } catch {
        // already closed
      }
    }
  }

  rejectAll(error) {
    this.queue = [];
    for (const p of this.pending.values()) p.reject(error);
    this.pending.clear();
  }

  setTimer(name, ms, fn) {
    this.clearTimer(name);
    this.timers[name] = this.clock.setTimeout(() => {
      delete this.timers[name];
      fn();
    }, ms);
  }

  clearTimer(name) {
    if (this.timers[name] !== undefined) {
      this.clock.clearTimeout(this.timers[name]);
      delete this.timers[name];
    }
  }
}

/** A reply frame without its `type` and `id`. */
function reply(frame) {
  const { type: _type, id: _id, ...rest } = frame;
  return rest;
}
