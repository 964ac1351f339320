// Fakes for the unit tests of the browser client: a clock that moves only when told, and
// WebSockets whose server side the test plays by hand.

import assert from "node:assert/strict";

/** Timers that fire only when the test advances time. */
export class FakeClock {
  now = 0;
  nextId = 1;
  timers = new Map();

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.now + ms, fn });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  /** Runs every timer due within `ms`, in order of due time (then of creation). */
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= until && (next === null || timer.at < next.at)) next = { id, ...timer };
      }
      if (next === null) break;
      this.timers.delete(next.id);
      this.now = next.at;
      next.fn();
    }
    this.now = until;
  }
}

/** A WebSocket constructor whose sockets the test opens, feeds and closes by hand. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.bufferedAmount = 0;
      this.closedWith = null;
      sockets.push(this);
    }
    send(text) {
      assert.equal(this.closedWith, null, "send on a closed socket");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
    }
    // The server's side.
    open() {
      this.onopen({});
    }
    receive(frame) {
      this.onmessage({ data: JSON.stringify(frame) });
    }
    serverClose(code, reason = "") {
      this.onclose({ code, reason });
    }
    types() {
      return this.sent.map((f) => f.type);
    }
    last() {
      return this.sent[this.sent.length - 1];
    }
  }
  return { FakeWebSocket, sockets };
}

/**
 * The Web Locks API of one browser, for the tabs of a test: exclusive locks granted in the order
 * asked, each held until its callback's promise settles or its tab is killed.
 */
export class FakeLocks {
  /** Who holds each lock: `{owner, release}`. */
  held = new Map();
  /** Requests waiting for each lock: `{owner, callback, done}`. */
  waiting = new Map();

  /** The `navigator.locks` of tab `owner`. */
  of(owner) {
    return { request: (name, callback) => this.request(owner, name, callback) };
  }

  request(owner, name, callback) {
    return new Promise((done) => {
      if (!this.waiting.has(name)) this.waiting.set(name, []);
      this.waiting.get(name).push({ owner, callback, done });
      this.grant(name);
    });
  }

  grant(name) {
    const queue = this.waiting.get(name);
    if (this.held.has(name) || !queue?.length) return;
    const { owner, callback, done } = queue.shift();
    const lock = { owner };
    this.held.set(name, lock);
    const release = () => {
      if (this.held.get(name) !== lock) return;
      this.held.delete(name);
      this.grant(name);
    };
    // Granted in a later task, as browsers do.
    setImmediate(() => {
      Promise.resolve(callback({ name })).then(
        (value) => {
          release();
          done(value);
        },
        () => release(),
      );
    });
  }

  /** Tab `owner` is gone: its locks are released and its requests dropped. */
  kill(owner) {
    for (const queue of this.waiting.values()) {
      for (let i = queue.length - 1; i >= 0; i--) if (queue[i].owner === owner) queue.splice(i, 1);
    }
    for (const [name, lock] of [...this.held]) {
      if (lock.owner !== owner) continue;
      this.held.delete(name);
      this.grant(name);
    }
  }
}
