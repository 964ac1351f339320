// Unit tests of client.js: its state machine, backoff, resume, heartbeats, queue and
// backpressure, with a fake clock, a fake random source and a fake WebSocket.
// Run: node --test gateway/web/test/

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  CLOSED,
  CONNECTING,
  Client,
  OPEN,
  RECONNECTING,
  backoffDelay,
} from "../client.js";
import { FakeClock, fakeWebSocket } from "../testing/fakes.mjs";

/** A client on fakes, with every event it emits recorded. */
function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocket();
  const client = new Client({
    shared: false, // one tab alone: Node may have Web Locks and BroadcastChannel
    url: "ws://gw.test/ws",
    clock,
    random: () => 0.5, // the jitter factor 0.5 + random() is then exactly 1
    WebSocket: FakeWebSocket,
    ...options,
  });
  const events = [];
  for (const type of ["state", "welcome", "subscribed", "message", "join", "leave", "reconnect", "error"]) {
    client.on(type, (event) => events.push({ type, event }));
  }
  const of = (type) => events.filter((e) => e.type === type).map((e) => e.event);
  const socket = () => sockets[sockets.length - 1];
  return { client, clock, sockets, socket, events, of };
}

function welcome(fields = {}) {
  return {
    type: "welcome",
    session: "s1",
    node: "n1",
    resumed: false,
    heartbeat: 25,
    channels: {},
    ...fields,
  };
}

/** Connects, opens the socket and answers its hello. */
function connected(options) {
  const t = setup(options);
  t.client.connect();
  t.socket().open();
  t.socket().receive(welcome());
  return t;
}

/** Lets pending promise callbacks run. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

test("backoff doubles from 1 s, is capped at 30 s, then jittered by 0.5 + random", () => {
  const exact = [0, 1, 2, 3, 4, 5, 6, 10].map((n) => backoffDelay(n, () => 0.5));
  assert.deepEqual(exact, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
  assert.equal(backoffDelay(0, () => 0), 500);
  assert.equal(backoffDelay(2, () => 0.999), 4000 * 1.499);
  assert.equal(backoffDelay(9, () => 0), 15000); // the cap applies before the jitter
  assert.equal(backoffDelay(1, () => 0.5, { minDelay: 100, maxDelay: 150 }), 150);
});

test("connects through CONNECTING to OPEN, offering bgw.v1 and saying hello first", () => {
  const t = setup();
  assert.equal(t.client.state, CLOSED);
  t.client.connect();
  assert.equal(t.client.state, CONNECTING);
  assert.equal(t.socket().url, "ws://gw.test/ws");
  assert.deepEqual(t.socket().protocols, ["bgw.v1"]);
  t.socket().open();
  assert.deepEqual(t.socket().sent, [{ type: "hello" }]);
  t.socket().receive(welcome());
  assert.equal(t.client.state, OPEN);
  assert.equal(t.client.session, "s1");
  assert.deepEqual(t.of("state"), [
    { state: CONNECTING, previous: CLOSED },
    { state: OPEN, previous: CONNECTING },
  ]);
  assert.deepEqual(t.of("welcome"), [{ session: "s1", node: "n1", resumed: false, heartbeat: 25 }]);
});

test("reconnects with backoff 1, 2, 4 ... s and surfaces the error after maxAttempts", () => {
  const t = connected({ maxAttempts: 4 });
  t.socket().serverClose(1006);
  assert.equal(t.client.state, RECONNECTING);
  const delays = [];
  for (let i = 0; i < 4; i++) {
    const scheduled = t.of("reconnect").at(-1);
    delays.push(scheduled.delay);
    const before = t.sockets.length;
    t.clock.advance(scheduled.delay - 1);
    assert.equal(t.sockets.length, before, "no attempt before its delay");
    t.clock.advance(1);
    assert.equal(t.sockets.length, before + 1);
    assert.equal(t.client.state, RECONNECTING);
    t.socket().serverClose(1006); // refused before the upgrade
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000]);
  assert.equal(t.client.state, CLOSED);
  assert.equal(t.of("error").at(-1).code, "reconnect_failed");
  const count = t.sockets.length;
  t.clock.advance(3600_000);
  assert.equal(t.sockets.length, count, "no attempt after giving up");
});

test("the jitter comes from the injected random source", () => {
  const randoms = [0.1, 0.9];
  const t = connected({ random: () => randoms.shift() });
  t.socket().serverClose(1006);
  assert.equal(t.of("reconnect")[0].delay, 600);
  t.clock.advance(600);
  t.socket().serverClose(1006);
  assert.equal(t.of("reconnect")[1].delay, 2800);
});

test("a welcome resets the backoff", () => {
  const t = connected();
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.socket().serverClose(1006);
  t.clock.advance(2000);
  t.socket().open();
  t.socket().receive(welcome());
  t.socket().serverClose(1011);
  assert.deepEqual(
    t.of("reconnect").map((r) => r.delay),
    [1000, 2000, 1000],
  );
});

test("the token callback is asked before every connection, and may be async", async () => {
  let asked = 0;
  const t = setup({ token: async () => `tok${++asked}` });
  t.client.connect();
  await settle();
  t.socket().open();
  assert.deepEqual(t.socket().sent, [{ type: "hello", token: "tok1" }]);
  t.socket().receive(welcome());
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  await settle();
  t.socket().open();
  assert.deepEqual(t.socket().sent[0], { type: "hello", token: "tok2", session: "s1", since: {} });
  assert.equal(asked, 2);
});

test("a failing token callback is an error and a failed attempt", async () => {
  let fail = true;
  const t = setup({
    token: () => {
      if (fail) throw new Error("no token service");
      return "t";
    },
  });
  t.client.connect();
  assert.equal(t.sockets.length, 0);
  assert.equal(t.of("error")[0].code, "token");
  assert.equal(t.client.state, RECONNECTING);
  fail = false;
  t.clock.advance(1000);
  t.socket().open();
  assert.equal(t.socket().sent[0].token, "t");
});

test("a token that comes after close() opens nothing", async () => {
  let release;
  const t = setup({ token: () => new Promise((resolve) => (release = resolve)) });
  t.client.connect();
  t.client.close();
  release("late");
  await settle();
  assert.equal(t.sockets.length, 0);
  assert.equal(t.client.state, CLOSED);
});

test("after 4001 nothing reconnects until a new token is supplied", async () => {
  const t = connected({ token: "old" });
  const written = t.client.publish("news", 1);
  t.socket().bufferedAmount = 10 * 1024 * 1024;
  const queued = t.client.publish("news", 2);
  t.socket().serverClose(4001, "unauthorized");
  await assert.rejects(written, { code: "connection_lost" });
  assert.equal(t.client.state, CLOSED);
  assert.equal(t.of("error").at(-1).code, "unauthorized");
  assert.equal(t.of("error").at(-1).closeCode, 4001);
  t.clock.advance(3600_000);
  assert.equal(t.sockets.length, 1);
  t.client.setToken("new");
  assert.equal(t.client.state, CONNECTING);
  t.socket().open();
  assert.equal(t.socket().sent[0].token, "new");
  assert.equal(t.socket().sent[0].session, "s1");
  t.socket().receive(welcome({ resumed: true }));
  assert.equal(t.client.state, OPEN);
  assert.deepEqual(t.socket().sent.at(-1), { type: "publish", id: 2, channel: "news", data: 2 });
  t.socket().receive({ type: "published", id: 2, channel: "news", seq: 7 });
  assert.deepEqual(await queued, { channel: "news", seq: 7 });
});

test("after 4009 (taken over) the client stops", () => {
  const t = connected();
  t.socket().serverClose(4009, "session taken over");
  assert.equal(t.client.state, CLOSED);
  assert.equal(t.of("error").at(-1).code, "taken_over");
  t.clock.advance(3600_000);
  assert.equal(t.sockets.length, 1);
});

test("close 1001 reconnects at once with jitter, not after a backoff", () => {
  const t = connected({ random: () => 0.2 });
  t.client.subscribe("news");
  t.socket().receive({ type: "subscribed", id: 1, channel: "news", seq: 3, epoch: "e", recovered: true });
  t.socket().serverClose(1001, "node draining");
  assert.equal(t.client.state, RECONNECTING);
  const [scheduled] = t.of("reconnect");
  assert.equal(scheduled.delay, 0.2 * 500);
  assert.equal(scheduled.code, 1001);
  t.clock.advance(100);
  t.socket().open();
  assert.deepEqual(t.socket().sent[0], {
    type: "hello",
    session: "s1",
    since: { news: { seq: 3, epoch: "e" } },
  });
  // A drained node's neighbour is down too: the backoff takes over from its start.
  t.socket().serverClose(1006);
  assert.equal(t.of("reconnect").at(-1).delay, 1000 * 0.7);
});

test("resume: session and positions in hello, restored channels, repeats dropped", () => {
  const t = connected();
  t.client.subscribe("news");
  t.client.subscribe("sport", { since: { seq: 0 } });
  assert.deepEqual(t.socket().sent.slice(1), [
    { type: "subscribe", id: 1, channel: "news" },
    { type: "subscribe", id: 2, channel: "sport", since: { seq: 0 } },
  ]);
  t.socket().receive({ type: "subscribed", id: 1, channel: "news", seq: 10, epoch: "E", recovered: true });
  t.socket().receive({ type: "subscribed", id: 2, channel: "sport", seq: 2, epoch: "F", recovered: true });
  t.socket().receive({ type: "message", channel: "sport", seq: 1, data: "s1" });
  t.socket().receive({ type: "message", channel: "sport", seq: 2, data: "s2" });
  t.socket().receive({ type: "message", channel: "news", seq: 11, data: "n11" });
  t.socket().receive({ type: "message", channel: "news", seq: 12, data: "n12" });
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.socket().open();
  assert.deepEqual(t.socket().sent, [
    {
      type: "hello",
      session: "s1",
      since: { news: { seq: 12, epoch: "E" }, sport: { seq: 2, epoch: "F" } },
    },
  ]);
  t.socket().receive(
    welcome({
      resumed: true,
      node: "n2",
      channels: {
        news: { seq: 14, epoch: "E", recovered: true },
        sport: { seq: 2, epoch: "F", recovered: true },
      },
    }),
  );
  assert.equal(t.client.state, OPEN);
  assert.equal(t.socket().sent.length, 1, "restored channels are not subscribed again");
  // A repeat (say, from a replay that overlaps) is dropped by seq.
  for (const seq of [12, 13, 13, 14, 15]) {
    t.socket().receive({ type: "message", channel: "news", seq, data: `n${seq}` });
  }
  const news = t.of("message").filter((m) => m.channel === "news").map((m) => m.seq);
  assert.deepEqual(news, [11, 12, 13, 14, 15]);
  assert.deepEqual(
    t.of("subscribed").slice(2).map((s) => [s.channel, s.recovered, s.resumed]),
    [
      ["news", true, true],
      ["sport", true, true],
    ],
  );
  assert.deepEqual(t.client.positions(), {
    news: { seq: 15, epoch: "E" },
    sport: { seq: 2, epoch: "F" },
  });
});

test("a subscribe answered only by the resume: the replay from the stored position is kept", () => {
  const t = connected();
  t.client.subscribe("news");
  t.socket().serverClose(1006); // before its subscribed reply
  t.clock.advance(1000);
  t.socket().open();
  assert.deepEqual(t.socket().sent, [{ type: "hello", session: "s1", since: {} }]);
  t.socket().receive(
    welcome({ resumed: true, channels: { news: { seq: 5, epoch: "E", recovered: true } } }),
  );
  for (const seq of [4, 5, 6]) t.socket().receive({ type: "message", channel: "news", seq, data: seq });
  assert.deepEqual(t.of("message").map((m) => m.seq), [4, 5, 6]);
  assert.deepEqual(t.client.positions(), { news: { seq: 6, epoch: "E" } });
});

test("a lost session: subscribe again from the positions, recovered: false is reported", () => {
  const t = connected();
  t.client.subscribe("news");
  t.socket().receive({ type: "subscribed", id: 1, channel: "news", seq: 4, epoch: "old", recovered: true });
  t.socket().receive({ type: "message", channel: "news", seq: 5, data: 5 });
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.socket().open();
  t.socket().receive(welcome({ session: "s2", resumed: false }));
  assert.deepEqual(t.socket().sent.slice(1), [
    { type: "subscribe", id: 2, channel: "news", since: { seq: 5, epoch: "old" } },
  ]);
  // The broker lost its history: a new epoch, seq starting again at 1.
  t.socket().receive({ type: "subscribed", id: 2, channel: "news", seq: 1, epoch: "new", recovered: false });
  t.socket().receive({ type: "message", channel: "news", seq: 1, data: "stale" }); // not after seq 1
  t.socket().receive({ type: "message", channel: "news", seq: 2, data: "fresh" });
  assert.deepEqual(t.of("subscribed").at(-1), {
    channel: "news",
    seq: 1,
    epoch: "new",
    recovered: false,
    resumed: false,
  });
  assert.deepEqual(t.of("message").map((m) => m.data), [5, "fresh"]);
  assert.equal(t.client.session, "s2");
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.socket().open();
  assert.deepEqual(t.socket().sent[0].since, { news: { seq: 2, epoch: "new" } });
  assert.equal(t.socket().sent[0].session, "s2");
});

test("an unsolicited subscribed with recovered: false moves the position on", () => {
  const t = connected();
  t.client.subscribe("news");
  t.socket().receive({ type: "subscribed", id: 1, channel: "news", seq: 0, epoch: "E", recovered: true });
  t.socket().receive({ type: "message", channel: "news", seq: 1, data: 1 });
  t.socket().receive({ type: "subscribed", channel: "news", seq: 6, epoch: "E", recovered: false });
  t.socket().receive({ type: "message", channel: "news", seq: 7, data: 7 });
  assert.deepEqual(t.of("message").map((m) => m.seq), [1, 7]);
  assert.equal(t.of("subscribed").at(-1).recovered, false);
});

test("channels changed while away are reconciled after welcome", () => {
  const t = connected();
  t.client.subscribe("a");
  t.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 0, epoch: "E", recovered: true });
  t.socket().serverClose(1006);
  t.client.unsubscribe("a");
  t.client.subscribe("b");
  t.clock.advance(1000);
  t.socket().open();
  t.socket().receive(
    welcome({ resumed: true, channels: { a: { seq: 0, epoch: "E", recovered: true } } }),
  );
  assert.deepEqual(t.socket().sent.slice(1), [
    { type: "unsubscribe", id: 2, channel: "a" },
    { type: "subscribe", id: 3, channel: "b" },
  ]);
  // Its "not subscribed" reply would not be an error worth reporting; a refused subscribe is.
  t.socket().receive({ type: "error", id: 2, code: 404, message: "not subscribed" });
  t.socket().receive({ type: "error", id: 3, code: 403, message: "forbidden" });
  const errors = t.of("error");
  assert.equal(errors.length, 1);
  assert.equal(errors[0].status, 403);
  assert.equal(errors[0].channel, "b");
  assert.deepEqual(t.client.positions(), {});
});

test("ping every heartbeat interval; a pong keeps the connection", () => {
  const t = connected();
  t.clock.advance(24_999);
  assert.deepEqual(t.socket().types(), ["hello"]);
  t.clock.advance(1);
  assert.deepEqual(t.socket().last(), { type: "ping" });
  t.clock.advance(9_000);
  t.socket().receive({ type: "pong" });
  t.clock.advance(16_000);
  assert.deepEqual(t.socket().types(), ["hello", "ping", "ping"]);
  for (let i = 0; i < 10; i++) {
    t.socket().receive({ type: "pong" });
    t.clock.advance(25_000);
  }
  assert.equal(t.socket().types().length, 13);
  assert.equal(t.client.state, OPEN);
  assert.equal(t.sockets.length, 1);
});

test("no pong within 10 s: the socket is closed and replaced", () => {
  const t = connected();
  t.clock.advance(25_000);
  t.socket().receive({ type: "message", channel: "x", seq: 1, data: 1 }); // not a pong
  t.clock.advance(9_999);
  assert.equal(t.client.state, OPEN);
  t.clock.advance(1);
  const dead = t.sockets[0];
  assert.equal(t.client.state, RECONNECTING);
  assert.notEqual(dead.closedWith, null);
  assert.equal(t.of("reconnect")[0].delay, 1000);
  // The dead socket's late close event changes nothing.
  dead.serverClose(1006);
  assert.equal(t.of("reconnect").length, 1);
  t.clock.advance(1000);
  assert.equal(t.sockets.length, 2);
});

test("the heartbeat interval comes from welcome", () => {
  const t = setup();
  t.client.connect();
  t.socket().open();
  t.socket().receive(welcome({ heartbeat: 2 }));
  t.clock.advance(2000);
  assert.deepEqual(t.socket().types(), ["hello", "ping"]);
});

test("an attempt without welcome in time is dropped", () => {
  const t = setup();
  t.client.connect();
  t.clock.advance(10_000);
  assert.notEqual(t.sockets[0].closedWith, null);
  assert.equal(t.client.state, RECONNECTING);
  t.clock.advance(1000);
  assert.equal(t.sockets.length, 2);
});

test("publishes queue while not OPEN, bounded, and go out after welcome", async () => {
  const t = setup({ maxQueue: 2 });
  const first = t.client.publish("news", { a: 1 });
  t.client.connect();
  t.socket().open();
  const second = t.client.publish("news", [2]);
  await assert.rejects(t.client.publish("news", 3), { code: "queue_full" });
  assert.deepEqual(t.socket().types(), ["hello"]);
  t.socket().receive(welcome());
  assert.deepEqual(t.socket().sent.slice(1), [
    { type: "publish", id: 1, channel: "news", data: { a: 1 } },
    { type: "publish", id: 2, channel: "news", data: [2] },
  ]);
  t.socket().receive({ type: "published", id: 1, channel: "news", seq: 1 });
  t.socket().receive({ type: "error", id: 2, code: 403, message: "not allowed" });
  assert.deepEqual(await first, { channel: "news", seq: 1 });
  await assert.rejects(second, { code: "server", status: 403 });
  assert.equal(t.of("error").length, 0, "a rejected publish is not an error event too");
});

test("a publish written to a lost connection fails; a queued one survives", async () => {
  const t = connected();
  const written = t.client.publish("news", 1);
  t.socket().bufferedAmount = 10 * 1024 * 1024;
  const held = t.client.publish("news", 2);
  t.socket().serverClose(1006);
  await assert.rejects(written, { code: "connection_lost" });
  t.clock.advance(1000);
  t.socket().open();
  t.socket().receive(welcome({ resumed: true }));
  assert.deepEqual(t.socket().last(), { type: "publish", id: 2, channel: "news", data: 2 });
  t.socket().receive({ type: "published", id: 2, channel: "news", seq: 2 });
  assert.deepEqual(await held, { channel: "news", seq: 2 });
});

test("publishing pauses while bufferedAmount is above the high-water mark", () => {
  const t = connected({ highWaterMark: 1000 });
  t.socket().bufferedAmount = 1001;
  t.client.publish("news", 1);
  t.client.publish("news", 2);
  assert.deepEqual(t.socket().types(), ["hello"]);
  t.clock.advance(500);
  assert.deepEqual(t.socket().types(), ["hello"]);
  t.socket().bufferedAmount = 1000;
  t.clock.advance(50);
  assert.deepEqual(t.socket().types(), ["hello", "publish", "publish"]);
});

test("close() stops everything and fails what waits", async () => {
  const t = connected();
  t.socket().bufferedAmount = 10 * 1024 * 1024;
  const held = t.client.publish("news", 1);
  t.client.close();
  assert.equal(t.client.state, CLOSED);
  assert.deepEqual(t.sockets[0].closedWith, { code: 1000, reason: "client closed" });
  await assert.rejects(held, { code: "closed" });
  await assert.rejects(t.client.publish("news", 2), { code: "closed" });
  t.clock.advance(3600_000);
  assert.equal(t.sockets.length, 1);
  t.client.connect();
  assert.equal(t.client.state, CONNECTING);
  assert.equal(t.sockets.length, 2);
});

test("the URL defaults to /ws on the page's server", () => {
  const saved = globalThis.location;
  try {
    globalThis.location = { href: "https://example.com:8443/app/index.html" };
    assert.equal(new Client({ WebSocket: class {} }).url, "wss://example.com:8443/ws");
    globalThis.location = { href: "http://127.0.0.1:8080/" };
    assert.equal(new Client({ WebSocket: class {} }).url, "ws://127.0.0.1:8080/ws");
  } finally {
    globalThis.location = saved;
  }
});

test("the page's offline, online and visibilitychange reach the connection", () => {
  const saved = { window: globalThis.window, document: globalThis.document };
  try {
    globalThis.window = new EventTarget();
    const document = new EventTarget();
    document.visibilityState = "visible";
    globalThis.document = document;
    const t = connected();
    // A tab made visible again checks the connection with a ping.
    document.visibilityState = "hidden";
    document.dispatchEvent(new Event("visibilitychange"));
    assert.deepEqual(t.socket().types(), ["hello"]);
    document.visibilityState = "visible";
    document.dispatchEvent(new Event("visibilitychange"));
    assert.deepEqual(t.socket().types(), ["hello", "ping"]);
    // Online after offline: a reconnect at once, and the session resumes.
    globalThis.window.dispatchEvent(new Event("offline"));
    assert.equal(t.client.state, OPEN, "a socket may live through a short loss");
    globalThis.window.dispatchEvent(new Event("online"));
    assert.deepEqual(t.of("reconnect"), [{ delay: 0, attempt: 0, code: null, reason: "the network is back" }]);
    t.clock.advance(0);
    assert.equal(t.sockets.length, 2);
    t.socket().open();
    assert.deepEqual(t.socket().sent[0], { type: "hello", session: "s1", since: {} });
    // A closed client relays nothing.
    t.client.close();
    globalThis.window.dispatchEvent(new Event("offline"));
    globalThis.window.dispatchEvent(new Event("online"));
    assert.equal(t.sockets.length, 2);
  } finally {
    Object.assign(globalThis, saved);
  }
});

test("presence: asked for on subscribe and again after a lost session; join and leave become events", () => {
  const t = connected();
  t.client.subscribe("room.1", { presence: true });
  t.client.subscribe("news");
  assert.deepEqual(t.socket().sent.slice(1), [
    { type: "subscribe", id: 1, channel: "room.1", presence: true },
    { type: "subscribe", id: 2, channel: "news" },
  ]);
  t.socket().receive({ type: "subscribed", id: 1, channel: "room.1", seq: 0, epoch: "E", recovered: true });
  t.socket().receive({ type: "subscribed", id: 2, channel: "news", seq: 0, epoch: "F", recovered: true });
  const bob = { channel: "room.1", user: "bob", client: "e03b5d2c98a17f40", count: 2 };
  t.socket().receive({ type: "join", ...bob });
  t.socket().receive({ type: "leave", ...bob, count: 1 });
  // Of a channel subscribed without presence, or not subscribed: nothing; unknown types neither.
  t.socket().receive({ type: "join", ...bob, channel: "news" });
  t.socket().receive({ type: "join", ...bob, channel: "other" });
  t.socket().receive({ type: "later", channel: "room.1" });
  assert.deepEqual(t.of("join"), [bob]);
  assert.deepEqual(t.of("leave"), [{ ...bob, count: 1 }]);
  assert.deepEqual(t.of("error"), []);

  // The session is lost: subscribed again, with presence where it was asked for.
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.socket().open();
  t.socket().receive(welcome({ session: "s2" }));
  assert.deepEqual(t.socket().sent.slice(1), [
    { type: "subscribe", id: 3, channel: "room.1", since: { seq: 0, epoch: "E" }, presence: true },
    { type: "subscribe", id: 4, channel: "news", since: { seq: 0, epoch: "F" } },
  ]);
});
