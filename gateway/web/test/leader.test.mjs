// Unit tests of leader.js with client.js: tabs without a SharedWorker share one connection
// through the tab that holds a Web Lock, over Node's own BroadcastChannel, on fake locks, a fake
// clock and a fake WebSocket; the leader tab dies and the next one takes the session over.
// Run: node --test gateway/web/test/

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { Client } from "../client.js";
import { FakeClock, FakeLocks, fakeWebSocket } from "../testing/fakes.mjs";

let channels = [];

afterEach(() => {
  for (const channel of channels) channel.close();
  channels = [];
});

/** A browser's worth of fakes; `tab()` opens a client in a new tab of it. */
function browser() {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocket();
  const locks = new FakeLocks();
  const url = `ws://gw.test/ws?run=${Math.random()}`; // a channel name of this test's own
  let tabs = 0;
  return {
    clock,
    sockets,
    socket: () => sockets[sockets.length - 1],
    tab() {
      const name = `tab${++tabs}`;
      const client = new Client({
        url,
        clock,
        random: () => 0.5,
        WebSocket: FakeWebSocket,
        locks: locks.of(name),
        BroadcastChannel: class extends BroadcastChannel {
          constructor(...args) {
            super(...args);
            channels.push(this);
          }
        },
      });
      const seen = { messages: [], subscribed: [], welcomes: [], errors: [] };
      client.on("message", (m) => seen.messages.push(`${m.channel}${m.seq}`));
      client.on("subscribed", (s) => seen.subscribed.push(s));
      client.on("welcome", (w) => seen.welcomes.push(w));
      client.on("error", (e) => seen.errors.push(e));
      return {
        name,
        client,
        seen,
        /** The tab is closed or crashes: its locks go, its channel and its socket fall silent. */
        kill() {
          locks.kill(name);
          const { channel } = client.transport;
          channel.close();
          channel.postMessage = () => {}; // what its last callbacks would say, nobody hears
          client.transport.hub?.connection.drop();
        },
      };
    },
  };
}

/** Lets tasks run (lock grants, BroadcastChannel deliveries) until `check()` holds. */
async function until(what, check) {
  for (let i = 0; i < 500; i++) {
    if (check()) return;
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.fail(`never happened: ${what}`);
}

function welcome(fields = {}) {
  return { type: "welcome", session: "s1", node: "n1", resumed: false, heartbeat: 25, channels: {}, ...fields };
}

const frames = (socket) => socket.sent.slice(1);

/** Three tabs on one connection: tab1 (the leader) holds a and z, tab2 a, tab3 b. */
async function threeTabs() {
  const b = browser();
  const [t1, t2, t3] = [b.tab(), b.tab(), b.tab()];
  t1.client.subscribe("a");
  t1.client.subscribe("z");
  t1.client.connect();
  await until("tab1 to lead", () => t1.client.sharing === "leader");
  b.socket().open();
  b.socket().receive(welcome());
  b.socket().receive({ type: "subscribed", id: 1, channel: "a", seq: 0, epoch: "E", recovered: true });
  b.socket().receive({ type: "subscribed", id: 2, channel: "z", seq: 0, epoch: "Z", recovered: true });

  t2.client.subscribe("a");
  t2.client.connect();
  t3.client.subscribe("b");
  t3.client.connect();
  await until("tab3 to subscribe b through tab1", () => frames(b.socket()).length === 3);
  b.socket().receive({ type: "subscribed", id: 3, channel: "b", seq: 0, epoch: "F", recovered: true });
  await until("tab2 and tab3 to be open and subscribed", () =>
    [t2, t3].every((t) => t.client.state === "OPEN" && t.seen.subscribed.length === 1),
  );
  return { b, t1, t2, t3 };
}

test("tabs without a SharedWorker: one connection, through the tab that holds the lock", async () => {
  const { b, t1, t2, t3 } = await threeTabs();
  assert.deepEqual([t1, t2, t3].map((t) => t.client.sharing), ["leader", "follower", "follower"]);
  assert.equal(b.sockets.length, 1);
  assert.deepEqual(frames(b.socket()).map((f) => [f.type, f.channel]), [
    ["subscribe", "a"],
    ["subscribe", "z"],
    ["subscribe", "b"],
  ]);
  assert.deepEqual([t2, t3].map((t) => t.client.session), ["s1", "s1"]);

  for (const [channel, seq] of [["a", 1], ["b", 1], ["a", 2], ["z", 1]]) {
    b.socket().receive({ type: "message", channel, seq, data: seq });
  }
  await until("the followers' messages", () => t2.seen.messages.length === 2 && t3.seen.messages.length === 1);
  assert.deepEqual(t1.seen.messages, ["a1", "a2", "z1"]);
  assert.deepEqual(t2.seen.messages, ["a1", "a2"]);
  assert.deepEqual(t3.seen.messages, ["b1"]);

  const reply = t3.client.publish("b", "from tab3");
  await until("tab3's publish on the leader's socket", () => frames(b.socket()).length === 4);
  assert.deepEqual(frames(b.socket())[3], { type: "publish", id: 4, channel: "b", data: "from tab3" });
  b.socket().receive({ type: "published", id: 4, channel: "b", seq: 2 });
  assert.deepEqual(await reply, { channel: "b", seq: 2 });
  for (const t of [t1, t2, t3]) assert.deepEqual(t.seen.errors, []);
});

test("the leader tab dies: the next one resumes the session from the positions it saw, and every tab gets every message once", async () => {
  const { b, t1, t2, t3 } = await threeTabs();
  for (const [channel, seq] of [["a", 1], ["b", 1], ["a", 2], ["a", 3], ["b", 2]]) {
    b.socket().receive({ type: "message", channel, seq, data: seq });
  }
  await until("the followers' messages", () => t2.seen.messages.length === 3 && t3.seen.messages.length === 2);
  const lost = t3.client.publish("b", "to a leader that dies");
  await until("the publish on the leader's socket", () => frames(b.socket()).length === 4);

  t1.kill();
  await until("tab2 to lead", () => t2.client.sharing === "leader");
  await assert.rejects(lost, { code: "connection_lost" });
  assert.equal(b.sockets.length, 2);
  b.socket().open();
  // What tab2 saw on the channel: a up to 3 (its own), b up to 2 (sent to tab3); z was tab1's alone.
  assert.deepEqual(b.socket().sent[0], {
    type: "hello",
    session: "s1",
    since: { a: { seq: 3, epoch: "E" }, b: { seq: 2, epoch: "F" } },
  });
  await until("tab3 to join tab2", () => t2.client.transport.hub.tabs.get(t3.client.id)?.joined);
  b.socket().receive(
    welcome({
      resumed: true,
      node: "n2",
      channels: {
        a: { seq: 4, epoch: "E", recovered: true },
        b: { seq: 3, epoch: "F", recovered: true },
        z: { seq: 1, epoch: "Z", recovered: true },
      },
    }),
  );
  // z was wanted by the dead tab only.
  assert.deepEqual(frames(b.socket()), [{ type: "unsubscribe", id: 1, channel: "z" }]);
  // The replay after the positions, with a repeat, then live.
  for (const [channel, seq] of [["a", 3], ["a", 4], ["b", 3], ["b", 4], ["a", 5]]) {
    b.socket().receive({ type: "message", channel, seq, data: seq });
  }
  await until("tab3's messages", () => t3.seen.messages.length === 4);
  assert.deepEqual(t2.seen.messages, ["a1", "a2", "a3", "a4", "a5"]);
  assert.deepEqual(t3.seen.messages, ["b1", "b2", "b3", "b4"]);
  for (const t of [t2, t3]) {
    assert.deepEqual(t.seen.welcomes.map((w) => [w.node, w.resumed]), [["n1", false], ["n2", true]]);
    assert.ok(t.seen.subscribed.every((s) => s.recovered), JSON.stringify(t.seen.subscribed));
    assert.deepEqual(t.seen.errors, []);
  }
  assert.equal(t3.client.sharing, "follower");
});
