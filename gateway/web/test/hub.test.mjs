// Unit tests of hub.js: the reference counts of a connection shared by tabs, the routing of
// messages, events and replies to the tabs, the token provider, the takeover of a session from a
// seed, and the network hooks; on a fake clock and a fake WebSocket, with tabs as plain inboxes.
// Run: node --test gateway/web/test/

import assert from "node:assert/strict";
import { test } from "node:test";

import { CLOSED, CONNECTING, OPEN, RECONNECTING } from "../connection.js";
import { applySubscribed, Hub } from "../hub.js";
import { Mirror } from "../leader.js";
import { FakeClock, fakeWebSocket } from "../testing/fakes.mjs";

/** A hub on fakes; what it sends to each tab lands in that tab's inbox. */
function setup(options = {}, seed = undefined) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocket();
  const inboxes = new Map();
  const released = [];
  const hub = new Hub(
    { url: "ws://gw.test/ws", clock, random: () => 0.5, WebSocket: FakeWebSocket, ...options },
    {
      send(ids, msg) {
        for (const id of ids) {
          if (!inboxes.has(id)) inboxes.set(id, []);
          inboxes.get(id).push(structuredClone(msg));
        }
      },
      released: (channel) => released.push(channel),
    },
    seed,
  );
  const inbox = (tab) => inboxes.get(tab) ?? [];
  return {
    hub,
    clock,
    sockets,
    released,
    socket: () => sockets[sockets.length - 1],
    /** The events of `name` that `tab` got. */
    events: (tab, name) => inbox(tab).filter((m) => m.type === "event" && m.name === name).map((m) => m.event),
    replies: (tab) => inbox(tab).filter((m) => m.type === "reply"),
    tokenRequests: (tab) => inbox(tab).filter((m) => m.type === "token"),
    join: (tab, channels = {}, token = { kind: "none" }) => hub.receive(tab, { op: "join", channels, token }),
    /** Frames the client sent after its hello. */
    frames: () => sockets[sockets.length - 1].sent.slice(1),
  };
}

function welcome(fields = {}) {
  return { type: "welcome", session: "s1", node: "n1", resumed: false, heartbeat: 25, channels: {}, ...fields };
}

/** Opens the current socket and answers its hello. */
function open(t, fields) {
  t.socket().open();
  t.socket().receive(welcome(fields));
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

test("each channel is subscribed once for all its tabs, and unsubscribed when the last one leaves it", () => {
  const t = setup();
  t.join("t1", { a: null, b: null });
  t.join("t2", { b: null, c: null });
  assert.equal(t.sockets.length, 1, "one connection for both tabs");
  open(t);
  assert.deepEqual(t.frames(), [
    { type: "subscribe", id: 1, channel: "a" },
    { type: "subscribe", id: 2, channel: "b" },
    { type: "subscribe", id: 3, channel: "c" },
  ]);

  t.hub.receive("t1", { op: "unsubscribe", channel: "b" });
  assert.equal(t.frames().length, 3, "t2 still wants b");
  assert.deepEqual(t.events("t1", "unsubscribed"), [{ channel: "b" }]);
  t.hub.receive("t2", { op: "unsubscribe", channel: "b" });
  assert.deepEqual(t.frames().at(-1), { type: "unsubscribe", id: 4, channel: "b" });
  assert.deepEqual(t.released, ["b"]);

  t.hub.receive("t2", { op: "leave" });
  assert.deepEqual(t.frames().at(-1), { type: "unsubscribe", id: 5, channel: "c" });
  assert.equal(t.hub.connection.state, OPEN, "t1 is still there");
  t.hub.receive("t1", { op: "leave" });
  assert.equal(t.hub.connection.state, CLOSED);
  assert.deepEqual(t.socket().closedWith, { code: 1000, reason: "client closed" });
  assert.equal(t.frames().length, 5, "no unsubscribe sent to a closing connection");
  assert.deepEqual(t.released, ["b", "c", "a"]);
});

test("messages and subscribed go to the tabs of their channel; connection events to every tab that joined", () => {
  const t = setup();
  t.join("t1", { a: null });
  t.join("t2", { a: null, b: null });
  t.join("t3", {});
  open(t);
  t.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 4, epoch: "E", recovered: true });
  t.socket().receive({ type: "subscribed", id: 2, channel: "b", seq: 0, epoch: "F", recovered: true });
  t.socket().receive({ type: "message", channel: "a", seq: 5, data: "a5" });
  t.socket().receive({ type: "message", channel: "b", seq: 1, data: "b1" });

  assert.deepEqual(t.events("t1", "message").map((m) => m.data), ["a5"]);
  assert.deepEqual(t.events("t2", "message").map((m) => m.data), ["a5", "b1"]);
  assert.deepEqual(t.events("t3", "message"), []);
  assert.deepEqual(t.events("t1", "subscribed"), [
    { channel: "a", seq: 4, epoch: "E", recovered: true, resumed: false, start: 4 },
  ]);
  assert.deepEqual(t.events("t2", "subscribed").map((s) => s.channel), ["a", "b"]);
  assert.deepEqual(t.events("t3", "subscribed"), []);
  for (const tab of ["t1", "t2", "t3"]) {
    assert.deepEqual(t.events(tab, "welcome"), [{ session: "s1", node: "n1", resumed: false, heartbeat: 25 }]);
    assert.deepEqual(t.events(tab, "state").map((s) => s.state), [CONNECTING, OPEN]);
  }
  t.socket().serverClose(1006);
  for (const tab of ["t1", "t2", "t3"]) {
    assert.deepEqual(t.events(tab, "reconnect"), [{ delay: 1000, attempt: 1, code: 1006, reason: "" }]);
  }
});

test("publish replies and errors go back to the tab that asked, under that tab's own id", async () => {
  const t = setup();
  t.join("t1");
  t.join("t2");
  open(t);
  t.hub.receive("t1", { op: "publish", id: 7, channel: "news", data: "from t1" });
  t.hub.receive("t2", { op: "publish", id: 7, channel: "news", data: "from t2" });
  assert.deepEqual(t.frames(), [
    { type: "publish", id: 1, channel: "news", data: "from t1" },
    { type: "publish", id: 2, channel: "news", data: "from t2" },
  ]);
  t.socket().receive({ type: "published", id: 2, channel: "news", seq: 12 });
  t.socket().receive({ type: "error", id: 1, code: 403, message: "not allowed to publish" });
  await settle();
  assert.deepEqual(t.replies("t2"), [{ type: "reply", id: 7, value: { channel: "news", seq: 12 } }]);
  assert.deepEqual(t.replies("t1"), [
    { type: "reply", id: 7, error: { code: "server", message: "not allowed to publish", status: 403 } },
  ]);
  assert.deepEqual(t.events("t1", "error"), [], "a refused publish is not an error event too");
});

test("recovered: false reaches every tab of the channel, with where delivery goes on", () => {
  const t = setup();
  t.join("t1", { a: null });
  t.join("t2", { a: null });
  t.join("t3", { b: null });
  open(t);
  t.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 3, epoch: "E", recovered: true });
  t.socket().receive({ type: "subscribed", channel: "a", seq: 9, epoch: "E", recovered: false });
  for (const tab of ["t1", "t2"]) {
    assert.deepEqual(t.events(tab, "subscribed").at(-1), {
      channel: "a",
      seq: 9,
      epoch: "E",
      recovered: false,
      resumed: false,
      start: 9,
    });
  }
  assert.deepEqual(t.events("t3", "subscribed"), []);
});

test("a tab joining a channel held already starts where the connection is, without a new subscribe", () => {
  const t = setup();
  t.join("t1", { a: null });
  open(t);
  t.join("early", { a: null }); // before the connection's subscription is confirmed
  assert.deepEqual(t.events("early", "subscribed"), []);
  t.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 3, epoch: "E", recovered: true });
  assert.equal(t.events("early", "subscribed").length, 1, "the connection's own, when it comes");
  for (const seq of [4, 5]) t.socket().receive({ type: "message", channel: "a", seq, data: seq });
  t.join("t2", { a: null });
  t.join("t3", { a: { seq: 7, epoch: "E" } }); // ahead: it drops what it had by seq
  t.join("t4", { a: { seq: 2, epoch: "old" } }); // another sequence: nothing to replay from
  assert.deepEqual(t.frames(), [{ type: "subscribe", id: 1, channel: "a" }]);
  const joined = { channel: "a", seq: 5, epoch: "E", recovered: true, resumed: false, start: 5 };
  for (const tab of ["t2", "t3", "t4"]) assert.deepEqual(t.events(tab, "subscribed"), [joined]);
  const t4 = { seq: 2, epoch: "old", active: false };
  assert.equal(applySubscribed(t4, joined), false, "told it missed messages");
  assert.deepEqual(t4, { seq: 5, epoch: "E", active: true });
});

test("a tab with an older position than the shared connection's: subscribed again from it, a replay every tab dedupes", () => {
  const t = setup();
  t.join("t1", { a: null });
  open(t);
  t.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 3, epoch: "E", recovered: true });
  for (const seq of [4, 5]) t.socket().receive({ type: "message", channel: "a", seq, data: seq });
  t.join("t2", { a: { seq: 2, epoch: "E" } });
  assert.deepEqual(t.frames().slice(1), [
    { type: "unsubscribe", id: 2, channel: "a" },
    { type: "subscribe", id: 3, channel: "a", since: { seq: 2, epoch: "E" } },
  ]);
  assert.deepEqual(t.events("t2", "subscribed"), [], "not until the new subscription answers");
  t.socket().receive({ type: "message", channel: "a", seq: 6, data: 6 }); // the old subscription's
  // A third tab, further behind, before the answer: the pending subscription is superseded.
  t.join("t3", { a: { seq: 1 } });
  assert.deepEqual(t.frames().slice(3), [
    { type: "unsubscribe", id: 4, channel: "a" },
    { type: "subscribe", id: 5, channel: "a", since: { seq: 1, epoch: "E" } },
  ]);
  t.socket().receive({ type: "unsubscribed", id: 2, channel: "a" });
  t.socket().receive({ type: "subscribed", id: 3, channel: "a", seq: 6, epoch: "E", recovered: true });
  for (const seq of [3, 4, 5, 6]) t.socket().receive({ type: "message", channel: "a", seq, data: seq });
  t.socket().receive({ type: "unsubscribed", id: 4, channel: "a" });
  assert.deepEqual(t.events("t3", "subscribed"), [], "the superseded answer is ignored, and its replay");
  t.socket().receive({ type: "subscribed", id: 5, channel: "a", seq: 6, epoch: "E", recovered: true });
  for (const seq of [2, 3, 4, 5, 6, 7]) t.socket().receive({ type: "message", channel: "a", seq, data: seq });
  const answer = { channel: "a", seq: 6, epoch: "E", recovered: true, resumed: false, start: 1 };
  for (const tab of ["t1", "t2", "t3"]) {
    assert.deepEqual(t.events(tab, "subscribed").at(-1), answer);
    assert.deepEqual(t.events(tab, "message").map((m) => m.seq).slice(-6), [2, 3, 4, 5, 6, 7]);
  }
  // What each tab keeps: t1 had 5, t2 asked from 2, t3 from 1.
  const kept = (sub) => (applySubscribed(sub, answer), sub.seq);
  assert.deepEqual(
    [kept({ seq: 5, epoch: "E", active: true }), kept({ seq: 2, epoch: "E", active: false }), kept({ seq: 1, epoch: null, active: false })],
    [5, 2, 1],
  );
  assert.deepEqual(t.events("t1", "error"), []);
});

test("a refused subscription: every tab of the channel gets the error, and it is forgotten", () => {
  const t = setup();
  t.join("t1", { x: null, ok: null });
  t.join("t2", { x: null });
  open(t);
  t.socket().receive({ type: "error", id: 1, code: 403, message: "not allowed to subscribe" });
  const error = { code: "server", message: "not allowed to subscribe", status: 403, channel: "x" };
  assert.deepEqual(t.events("t1", "error"), [error]);
  assert.deepEqual(t.events("t2", "error"), [error]);
  assert.deepEqual(t.released, ["x"]);
  t.join("t3", { x: null }); // asks again: subscribed afresh
  assert.deepEqual(t.frames().at(-1), { type: "subscribe", id: 3, channel: "x" });
});

test("the connection opens with the first tab, is left alone while it connects, closes with the last tab", () => {
  const t = setup();
  t.join("t1");
  t.join("t2");
  assert.equal(t.sockets.length, 1);
  assert.deepEqual(t.events("t2", "state"), [{ state: CONNECTING }]);
  open(t);
  t.join("t3"); // joins an open connection: its welcome and state at once
  assert.deepEqual(t.events("t3", "welcome").length, 1);
  assert.deepEqual(t.events("t3", "state"), [{ state: OPEN }]);
  t.socket().serverClose(1006);
  assert.equal(t.hub.connection.state, RECONNECTING);
  t.join("t4"); // a tab connecting does not wait for the backoff
  assert.equal(t.sockets.length, 2);
  for (const tab of ["t1", "t2", "t3", "t4"]) t.hub.receive(tab, { op: "leave" });
  assert.equal(t.hub.connection.state, CLOSED);
  t.clock.advance(3600_000);
  assert.equal(t.sockets.length, 2);
});

test("the token: the hub's own tab's first, else the tab that supplied one last, asked over its port", async () => {
  const t = setup();
  t.join("t1", {}, { kind: "value", value: "one" });
  t.socket().open(); // a value needs no round trip
  assert.equal(t.socket().sent[0].token, "one");
  t.socket().receive(welcome());

  t.join("t2", {}, { kind: "callback" });
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  assert.deepEqual(t.tokenRequests("t2"), [{ type: "token", req: 1 }]);
  const sockets = t.sockets.length;
  t.hub.receive("t2", { op: "tokenReply", req: 1, token: "two" });
  await settle();
  assert.equal(t.sockets.length, sockets + 1);
  t.socket().open();
  assert.equal(t.socket().sent[0].token, "two");
  t.socket().receive(welcome());

  // A tab in the hub's own context (the leader tab) is asked first, by a plain call.
  let called = 0;
  t.join("leader", {}, { kind: "callback", call: () => `three${++called}`, local: true });
  t.hub.receive("t2", { op: "token", token: { kind: "value", value: "later" } });
  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.socket().open();
  assert.equal(t.socket().sent[0].token, "three1");
  assert.equal(t.tokenRequests("t2").length, 1);
});

test("a tab asked for the token that goes away: the next one is asked; a failing one is an error", async () => {
  const t = setup();
  t.join("t1", {}, { kind: "callback" });
  assert.deepEqual(t.tokenRequests("t1"), [{ type: "token", req: 1 }]);
  t.join("t2", {}, { kind: "callback" });
  assert.equal(t.sockets.length, 0, "waiting for t1's token");
  t.hub.detach("t1");
  assert.deepEqual(t.tokenRequests("t2"), [{ type: "token", req: 2 }]);
  t.hub.receive("t2", { op: "tokenReply", req: 2, token: "two" });
  await settle();
  t.socket().open();
  assert.equal(t.socket().sent[0].token, "two");
  t.socket().receive(welcome());

  t.socket().serverClose(1006);
  t.clock.advance(1000);
  t.hub.receive("t2", { op: "tokenReply", req: 3, error: "no token service" });
  await settle();
  assert.deepEqual(t.events("t2", "error").at(-1), {
    code: "token",
    message: "the token callback failed: no token service",
  });
  assert.equal(t.events("t2", "reconnect").at(-1).reason, "token callback failed");
});

test("after 4001, a tab's new token connects again", () => {
  const t = setup();
  t.join("t1", {}, { kind: "value", value: "old" });
  open(t);
  t.socket().serverClose(4001, "token expired");
  assert.equal(t.hub.connection.state, CLOSED);
  assert.equal(t.events("t1", "error").at(-1).code, "unauthorized");
  t.hub.receive("t1", { op: "token", token: { kind: "value", value: "new" } });
  t.socket().open();
  assert.deepEqual(t.socket().sent[0], { type: "hello", token: "new", session: "s1", since: {} });
});

test("taking over a session: hello resumes the seed's session and positions; what no tab claims within the grace is dropped", () => {
  const seed = { session: "s0", positions: { a: { seq: 4, epoch: "E" }, b: { seq: 9, epoch: "F" } } };
  const t = setup({ handoverGrace: 2000 }, seed);
  assert.equal(t.sockets.length, 0, "no connection before a tab joins");
  t.join("t1", { a: { seq: 6, epoch: "E" } });
  t.socket().open();
  assert.deepEqual(t.socket().sent[0], { type: "hello", session: "s0", since: seed.positions });
  t.socket().receive(
    welcome({
      session: "s0",
      resumed: true,
      channels: { a: { seq: 7, epoch: "E", recovered: true }, b: { seq: 9, epoch: "F", recovered: true } },
    }),
  );
  assert.deepEqual(t.frames(), [], "both channels restored: nothing to subscribe or unsubscribe");
  assert.deepEqual(t.events("t1", "subscribed"), [
    { channel: "a", seq: 7, epoch: "E", recovered: true, resumed: true, start: 4 },
  ]);
  // The replay after the seed's position reaches t1, which drops what it had (client.js).
  for (const seq of [5, 6, 7]) t.socket().receive({ type: "message", channel: "a", seq, data: seq });
  assert.deepEqual(t.events("t1", "message").map((m) => m.seq), [5, 6, 7]);

  t.clock.advance(1999);
  assert.deepEqual(t.frames(), []);
  t.clock.advance(1);
  assert.deepEqual(t.frames(), [{ type: "unsubscribe", id: 1, channel: "b" }]);
  assert.deepEqual(t.released, ["b"]);
  assert.equal(t.hub.connection.state, OPEN);
});

test("a tab that joins a new leader's connection after its hello: subscribed again from the tab's position", () => {
  const seed = { session: "s0", positions: { a: { seq: 4, epoch: "E" } } };
  const t = setup({}, seed);
  t.join("t1", { a: { seq: 4, epoch: "E" } });
  t.socket().open();
  assert.deepEqual(t.socket().sent[0].since, { a: { seq: 4, epoch: "E" } });
  // t2 held c, which the dead leader's frames never showed this one.
  t.join("t2", { c: { seq: 2, epoch: "G" } });
  t.socket().receive(
    welcome({
      session: "s0",
      resumed: true,
      channels: { a: { seq: 4, epoch: "E", recovered: true }, c: { seq: 5, epoch: "G", recovered: true } },
    }),
  );
  assert.deepEqual(t.frames(), [
    { type: "unsubscribe", id: 1, channel: "c" },
    { type: "subscribe", id: 2, channel: "c", since: { seq: 2, epoch: "G" } },
  ]);
  assert.deepEqual(t.events("t2", "subscribed"), [], "not until the new subscription answers");
  // The restored subscription's replay, from where the gateway stored: ignored.
  for (const seq of [4, 5]) t.socket().receive({ type: "message", channel: "c", seq, data: seq });
  t.socket().receive({ type: "unsubscribed", id: 1, channel: "c" });
  t.socket().receive({ type: "subscribed", id: 2, channel: "c", seq: 5, epoch: "G", recovered: true });
  assert.deepEqual(t.events("t2", "subscribed"), [
    { channel: "c", seq: 5, epoch: "G", recovered: true, resumed: false, start: 2 },
  ]);
  for (const seq of [3, 4, 5, 6]) t.socket().receive({ type: "message", channel: "c", seq, data: seq });
  assert.deepEqual(t.events("t2", "message").map((m) => m.seq), [3, 4, 5, 6]);
});

test("online after offline reconnects at once, once for all the tabs that say so", () => {
  const t = setup();
  t.join("t1");
  t.join("t2");
  open(t);
  t.hub.receive("t1", { op: "online" }); // never went offline: nothing to do
  assert.equal(t.sockets.length, 1);
  t.hub.receive("t1", { op: "offline" });
  t.hub.receive("t2", { op: "offline" });
  t.hub.receive("t1", { op: "online" });
  t.hub.receive("t2", { op: "online" });
  assert.deepEqual(t.sockets[0].closedWith, { code: 1000, reason: "network changed" });
  assert.deepEqual(t.events("t1", "reconnect"), [
    { delay: 0, attempt: 0, code: null, reason: "the network is back" },
  ]);
  t.clock.advance(0);
  assert.equal(t.sockets.length, 2);
  t.socket().open();
  assert.deepEqual(t.socket().sent[0], { type: "hello", session: "s1", since: {} });
});

test("offline, failed attempts are not counted: no giving up until the network is back", () => {
  const t = setup({ maxAttempts: 2 });
  t.join("t1");
  open(t);
  t.hub.receive("t1", { op: "offline" });
  for (let i = 0; i < 6; i++) {
    t.socket().serverClose(1006);
    t.clock.advance(t.events("t1", "reconnect").at(-1).delay);
  }
  assert.equal(t.hub.connection.state, RECONNECTING);
  assert.deepEqual(t.events("t1", "error"), []);
  t.hub.receive("t1", { op: "online" });
  t.clock.advance(0);
  open(t);
  assert.equal(t.hub.connection.state, OPEN);
});

test("a check pings an open connection, and tries at once instead of waiting for the backoff", () => {
  const t = setup();
  t.join("t1");
  open(t);
  t.hub.receive("t1", { op: "check" });
  assert.deepEqual(t.frames(), [{ type: "ping" }]);
  t.clock.advance(10_000); // no pong: the connection was dead
  assert.equal(t.hub.connection.state, RECONNECTING);
  assert.equal(t.sockets.length, 1);
  t.hub.receive("t1", { op: "check" });
  assert.equal(t.sockets.length, 2, "no wait for the backoff's 1 s");
});

test("applySubscribed: what a tab makes of the shared connection's subscribed", () => {
  const cases = [
    // [the tab's subscription, the event, recovered for the tab, the tab's subscription after]
    ["a fresh subscription without a position starts where the connection does",
      { seq: null, epoch: null, active: false }, { seq: 3, epoch: "E", recovered: true, resumed: false, start: 3 },
      true, { seq: 3, epoch: "E", active: true }],
    ["one from a position the connection's replay covers keeps it",
      { seq: 0, epoch: null, active: false }, { seq: 2, epoch: "F", recovered: true, resumed: false, start: 0 },
      true, { seq: 0, epoch: "F", active: true }],
    ["one from an older position than the connection's start missed messages",
      { seq: 1, epoch: "E", active: false }, { seq: 5, epoch: "E", recovered: true, resumed: false, start: 5 },
      false, { seq: 5, epoch: "E", active: true }],
    ["one from another epoch missed messages",
      { seq: 7, epoch: "old", active: false }, { seq: 5, epoch: "E", recovered: true, resumed: false, start: 5 },
      false, { seq: 5, epoch: "E", active: true }],
    ["an active one keeps its own position: a replay from lower is dropped by seq",
      { seq: 8, epoch: "E", active: true }, { seq: 9, epoch: "E", recovered: true, resumed: true, start: 6 },
      true, { seq: 8, epoch: "E", active: true }],
    ["a resumed one without a position takes the replay from the gateway's",
      { seq: null, epoch: null, active: false }, { seq: 5, epoch: "E", recovered: true, resumed: true, start: null },
      true, { seq: null, epoch: "E", active: true }],
    ["recovered: false moves every tab on to the connection's position",
      { seq: 8, epoch: "E", active: true }, { seq: 1, epoch: "N", recovered: false, resumed: false, start: 1 },
      false, { seq: 1, epoch: "N", active: true }],
  ];
  for (const [what, sub, event, recovered, after] of cases) {
    assert.equal(applySubscribed(sub, event), recovered, what);
    assert.deepEqual(sub, after, what);
  }
});

test("a follower's mirror: the session and the positions of the channels the leader sent to tabs", () => {
  const mirror = new Mirror();
  assert.equal(mirror.seed(), undefined, "nothing to take over before a welcome");
  const event = (name, e) => ({ type: "event", name, event: e, leader: "L", to: ["t2"] });
  mirror.observe(event("welcome", { session: "s1", node: "n1", resumed: false, heartbeat: 25 }));
  mirror.observe(event("subscribed", { channel: "a", seq: 3, epoch: "E", recovered: true, resumed: false, start: 3 }));
  mirror.observe(event("message", { channel: "a", seq: 4, data: 4 }));
  mirror.observe(event("subscribed", { channel: "b", seq: 0, epoch: "F", recovered: true, resumed: false, start: 0 }));
  mirror.observe(event("message", { channel: "c", seq: 7, data: 7 })); // joined before its subscribed was seen
  mirror.observe({ type: "released", channel: "b", leader: "L", to: [] });
  mirror.observe({ type: "reply", id: 1, value: {}, leader: "L", to: ["t2"] });
  assert.deepEqual(mirror.seed(), { session: "s1", positions: { a: { seq: 4, epoch: "E" }, c: { seq: 7 } } });
  mirror.observe(event("welcome", { session: "s2", node: "n2", resumed: false, heartbeat: 25 }));
  assert.equal(mirror.seed().session, "s2");
});

test("presence: join and leave only to the tabs that asked; a tab asking later subscribes the channel again with it", () => {
  const t = setup();
  t.join("plain", { a: null });
  open(t);
  t.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 3, epoch: "E", recovered: true });
  t.socket().receive({ type: "message", channel: "a", seq: 4, data: 4 });
  // The connection holds `a` without presence: a tab that wants it subscribes it again, from
  // where delivery is, with it.
  t.hub.receive("watcher", { op: "join", channels: { a: null }, presence: ["a"], token: { kind: "none" } });
  assert.deepEqual(t.frames().slice(1), [
    { type: "unsubscribe", id: 2, channel: "a" },
    { type: "subscribe", id: 3, channel: "a", since: { seq: 4, epoch: "E" }, presence: true },
  ]);
  t.socket().receive({ type: "unsubscribed", id: 2, channel: "a" });
  t.socket().receive({ type: "subscribed", id: 3, channel: "a", seq: 4, epoch: "E", recovered: true });
  const carol = { channel: "a", user: "carol", client: "6c1f0a9e2b7d4415", count: 3 };
  t.socket().receive({ type: "join", ...carol });
  t.socket().receive({ type: "leave", ...carol, count: 2 });
  assert.deepEqual(t.events("watcher", "join"), [carol]);
  assert.deepEqual(t.events("watcher", "leave"), [{ ...carol, count: 2 }]);
  assert.deepEqual([...t.events("plain", "join"), ...t.events("plain", "leave")], []);
  // A third tab asking for it on the same channel: nothing more to ask of the server.
  t.hub.receive("t3", { op: "join", channels: {}, token: { kind: "none" } });
  t.hub.receive("t3", { op: "subscribe", channel: "a", since: null, presence: true });
  assert.equal(t.frames().length, 3);
  t.socket().receive({ type: "join", ...carol, count: 4 });
  assert.equal(t.events("t3", "join").length, 1);
  // The watcher leaves the channel: its frames stop.
  t.hub.receive("watcher", { op: "unsubscribe", channel: "a" });
  t.socket().receive({ type: "leave", ...carol, count: 3 });
  assert.equal(t.events("watcher", "leave").length, 1);
  assert.equal(t.events("t3", "leave").length, 1);
});
