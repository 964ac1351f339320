// End-to-end tests of the connection that the tabs of an origin share: headless chromium opens
// the demo page of a real gateway in several tabs of one profile, and the gateway's own counters
// say how many WebSockets and subscriptions they hold.
// Run after `cargo build -p gateway`: node --test gateway/web/e2e/
// Needs chromium and chromium-driver (deploy/test.sh installs them).

import assert from "node:assert/strict";
import { test } from "node:test";

import { labForTheFile, publishing, upTo, waitFor } from "./harness.mjs";

const TIMEOUT = 120_000;

/** Scripts that run before the page's own, taking away what the client would share through. */
const WITHOUT_SHARED_WORKER = "delete globalThis.SharedWorker;";
const WITHOUT_ANY_SHARING = `${WITHOUT_SHARED_WORKER}
  delete Navigator.prototype.locks;
  delete globalThis.BroadcastChannel;`;
/** A SharedWorker whose script is not where the client says (a page that copied client.js alone). */
const WORKER_NOT_FOUND = `{
  const SharedWorker = globalThis.SharedWorker;
  globalThis.SharedWorker = function (url, options) {
    return new SharedWorker("/no-such-worker.js", options);
  };
}`;

const e2e = labForTheFile();

/**
 * Opens the demo page of `gw` in a new tab, subscribed to `channels` (comma-separated), and waits
 * until every one of them is subscribed. `before`: a script run before the page's own.
 */
async function openTab(gw, channels, { before, query = "" } = {}) {
  const tab = await e2e.browser.newTab({ before });
  await tab.navigate(`http://127.0.0.1:${gw.port}/?channel=${channels}&connect${query}`);
  const count = channels.split(",").length;
  tab.opened = await tab.waitDemo(`the tab of ${channels} to subscribe`, (d) =>
    d.state === "OPEN" && new Set(d.subscribed.map((s) => s.channel)).size === count,
  );
  return tab;
}

/** The `data` of every message of `channel` that the tab's page received, in order. */
const received = (demo, channel) => demo.messages.filter((m) => m.channel === channel).map((m) => m.data);

/** The gateway's counters, once `check` holds for them. */
function waitStats(gw, what, check) {
  let last = null;
  return waitFor(`${what} (last stats: ${JSON.stringify(last)})`, async () => {
    last = await gw.stats();
    return check(last) ? last : null;
  });
}

test("SharedWorker: three tabs hold one WebSocket; each receives exactly the messages of its channels, once, in order", { timeout: TIMEOUT }, async (t) => {
  const gw = await e2e.lab.gateway();
  const a = await openTab(gw, "a,b");
  const b = await openTab(gw, "b");
  const c = await openTab(gw, "c");
  for (const tab of [a, b, c]) assert.equal(tab.opened.sharing, "worker");
  assert.equal(new Set([a, b, c].map((t) => t.opened.session)).size, 1, "one session");
  let stats = await gw.stats();
  assert.equal(stats.connections, 1, JSON.stringify(stats));
  assert.equal(stats.subscriptions, 3, "a, b and c, each once");
  const deliveries = stats.deliveries;

  const total = 20;
  for (const n of upTo(total)) {
    for (const channel of ["a", "b", "c"]) await gw.publish(channel, n);
  }
  const demos = {};
  for (const [name, tab, count] of [["a", a, 2 * total], ["b", b, total], ["c", c, total]]) {
    demos[name] = await tab.waitDemo(`${count} messages in tab ${name}`, (d) => d.messages.length >= count);
  }
  assert.deepEqual(received(demos.a, "a"), upTo(total));
  assert.deepEqual(received(demos.a, "b"), upTo(total));
  assert.deepEqual(demos.b.messages.map((m) => [m.channel, m.data]), upTo(total).map((n) => ["b", n]));
  assert.deepEqual(demos.c.messages.map((m) => [m.channel, m.data]), upTo(total).map((n) => ["c", n]));
  for (const demo of Object.values(demos)) assert.deepEqual(demo.errors, []);
  // Each message crossed the network once, though b's reached two tabs.
  stats = await gw.stats();
  assert.equal(stats.deliveries - deliveries, 3 * total, JSON.stringify(stats));
  t.diagnostic(`shared: ${3 * total} deliveries by the gateway for ${4 * total} messages received by the tabs`);

  // b is unsubscribed only when the last tab that wants it leaves.
  await b.close();
  await gw.publish("b", total + 1);
  await a.waitDemo("b after tab b left", (d) => received(d, "b").length === total + 1);
  stats = await gw.stats();
  assert.equal(stats.subscriptions, 3, JSON.stringify(stats));
  await a.close();
  stats = await waitStats(gw, "only c subscribed", (s) => s.subscriptions === 1);
  assert.equal(stats.connections, 1);
  await gw.publish("c", total + 1);
  const demo = await c.waitDemo("c after tab a left", (d) => d.messages.length === total + 1);
  assert.deepEqual(received(demo, "c"), upTo(total + 1));
  await c.close();
  await waitStats(gw, "no connection once every tab closed", (s) => s.connections === 0);
});

for (const [how, end] of [
  ["closed", (tab) => tab.close()],
  ["crashed", (tab) => tab.crash()],
]) test(`Web Locks and BroadcastChannel: one WebSocket; the leader tab ${how} mid-stream, the other tabs lose nothing and get nothing twice`, { timeout: TIMEOUT }, async () => {
  const gw = await e2e.lab.gateway();
  const options = { before: WITHOUT_SHARED_WORKER };
  const leader = await openTab(gw, "x,y", options);
  const b = await openTab(gw, "x", options);
  const c = await openTab(gw, "x,y", options);
  assert.deepEqual([leader, b, c].map((t) => t.opened.sharing), ["leader", "follower", "follower"]);
  assert.equal(new Set([leader, b, c].map((t) => t.opened.session)).size, 1, "one session");
  assert.equal((await gw.stats()).connections, 1);

  const x = publishing(() => gw, "x");
  const y = publishing(() => gw, "y");
  await b.waitDemo("messages before the leader closes", (d) => d.messages.length >= 10);
  await end(leader);
  const afterClose = x.last;
  // The next leader resumes the session, and carries on the stream.
  await waitFor("messages published after the leader closed", () => x.last >= afterClose + 10);
  const totalX = await x.stop();
  const totalY = await y.stop();
  const demoB = await b.waitDemo(`all ${totalX} of x in tab b`, (d) => d.messages.length >= totalX);
  const demoC = await c.waitDemo(`all of x and y in tab c`, (d) => d.messages.length >= totalX + totalY);

  assert.deepEqual(demoB.messages.map((m) => [m.channel, m.data]), upTo(totalX).map((n) => ["x", n]));
  assert.deepEqual(received(demoC, "x"), upTo(totalX), "x: every message once, in order");
  assert.deepEqual(received(demoC, "y"), upTo(totalY), "y: every message once, in order");
  assert.deepEqual(demoC.messages.filter((m) => m.channel === "x").map((m) => m.seq), upTo(totalX));
  const sharing = [demoB.sharing, demoC.sharing].sort();
  assert.deepEqual(sharing, ["follower", "leader"], "one of them took over");
  for (const demo of [demoB, demoC]) {
    assert.equal(demo.welcomes.length, 2, JSON.stringify(demo.welcomes));
    assert.equal(demo.welcomes[1].session, demo.welcomes[0].session);
    assert.equal(demo.welcomes[1].resumed, true, "the session resumed");
    assert.ok(demo.subscribed.every((s) => s.recovered), JSON.stringify(demo.subscribed));
    assert.deepEqual(demo.errors, []);
  }
  await waitStats(gw, "one connection again", (s) => s.connections === 1);
  await b.close();
  await c.close();
});

test("without SharedWorker, Web Locks and BroadcastChannel, or with shared=false: a WebSocket per tab", { timeout: TIMEOUT }, async (t) => {
  const gw = await e2e.lab.gateway();
  const a = await openTab(gw, "p", { before: WITHOUT_ANY_SHARING });
  const b = await openTab(gw, "p,q", { before: WITHOUT_ANY_SHARING });
  const c = await openTab(gw, "q", { query: "&shared=false" });
  assert.deepEqual([a, b, c].map((t) => t.opened.sharing), ["none", "none", "none"]);
  assert.equal(new Set([a, b, c].map((t) => t.opened.session)).size, 3, "a session each");
  let stats = await gw.stats();
  assert.equal(stats.connections, 3, JSON.stringify(stats));
  assert.equal(stats.subscriptions, 4);
  const deliveries = stats.deliveries;

  for (const n of upTo(5)) {
    await gw.publish("p", n);
    await gw.publish("q", n);
  }
  const demoA = await a.waitDemo("p in tab a", (d) => d.messages.length >= 5);
  const demoB = await b.waitDemo("p and q in tab b", (d) => d.messages.length >= 10);
  const demoC = await c.waitDemo("q in tab c", (d) => d.messages.length >= 5);
  assert.deepEqual(demoA.messages.map((m) => [m.channel, m.data]), upTo(5).map((n) => ["p", n]));
  assert.deepEqual([received(demoB, "p"), received(demoB, "q")], [upTo(5), upTo(5)]);
  assert.deepEqual(demoC.messages.map((m) => [m.channel, m.data]), upTo(5).map((n) => ["q", n]));
  // Every message a tab received crossed the network to that tab.
  stats = await gw.stats();
  assert.equal(stats.deliveries - deliveries, 20, JSON.stringify(stats));
  t.diagnostic("a connection per tab: 20 deliveries by the gateway for 20 messages received by the tabs");
  for (const tab of [a, b, c]) await tab.close();
});

test("a SharedWorker whose script does not load: the tabs share through a leader tab", { timeout: TIMEOUT }, async () => {
  const gw = await e2e.lab.gateway();
  const a = await openTab(gw, "w", { before: WORKER_NOT_FOUND });
  const b = await openTab(gw, "w", { before: WORKER_NOT_FOUND });
  assert.deepEqual([a.opened.sharing, b.opened.sharing], ["leader", "follower"]);
  assert.equal((await gw.stats()).connections, 1);
  await gw.publish("w", 1);
  for (const tab of [a, b]) {
    const demo = await tab.waitDemo("the message", (d) => d.messages.length === 1);
    assert.deepEqual(received(demo, "w"), [1]);
    assert.deepEqual(demo.errors, []);
  }
  await a.close();
  await b.close();
});

for (const [path, options] of [
  ["a SharedWorker", {}],
  ["a leader tab", { before: WITHOUT_SHARED_WORKER }],
  ["the tab alone", { before: WITHOUT_ANY_SHARING }],
]) {
  test(`offline, then online (DevTools network emulation), through ${path}: the connection resumes at once, and the stream goes on exactly once`, { timeout: TIMEOUT }, async (t) => {
    const gw = await e2e.lab.gateway();
    const tab = await openTab(gw, "net", options);
    const stream = publishing(() => gw, "net");
    await tab.waitDemo("messages before going offline", (d) => d.messages.length >= 5);
    await tab.run("window.addEventListener('offline', () => { window.wentOffline = true; });");
    await setOffline(tab, true);
    await waitFor("the page to hear offline", () => tab.run("return window.wentOffline === true"));
    await setOffline(tab, false);
    const online = Date.now();
    const demo = await tab.waitDemo("a new welcome", (d) => d.welcomes.length === 2);
    t.diagnostic(`${path}: welcome ${Date.now() - online} ms after online (polled every 50 ms)`);
    const resumed = stream.last;
    await waitFor("messages after the reconnect", () => stream.last >= resumed + 5);
    const total = await stream.stop();
    const final = await tab.waitDemo(`all ${total} messages`, (d) => d.messages.length >= total);

    // At once: a reconnect without a backoff delay, caused by the network and not by a close.
    assert.deepEqual(
      demo.reconnects.map(({ delay, code, reason }) => ({ delay, code, reason })),
      [{ delay: 0, code: null, reason: "the network is back" }],
    );
    assert.equal(demo.welcomes[1].resumed, true);
    assert.deepEqual(received(final, "net"), upTo(total));
    assert.deepEqual(final.errors, []);
    await tab.close();
  });
}

/** Takes the tab's network away, or gives it back. */
async function setOffline(tab, offline) {
  await tab.cdp("Network.enable");
  return tab.cdp("Network.emulateNetworkConditions", {
    offline,
    latency: 0,
    downloadThroughput: -1,
    uploadThroughput: -1,
  });
}
