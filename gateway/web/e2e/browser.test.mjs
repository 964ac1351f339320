// End-to-end tests of the browser client: headless chromium opens the demo page that a real
// gateway serves, and the test stops, restarts and drains gateway nodes under it.
// Run after `cargo build -p gateway`: node --test gateway/web/e2e/
// Needs redis-server, chromium and chromium-driver (deploy/test.sh installs them).

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { test } from "node:test";

import { labForTheFile, publishing, upTo, waitFor } from "./harness.mjs";

const TIMEOUT = 120_000;

const e2e = labForTheFile();

/** Opens the demo page of `port` subscribed to `channel`; resolves once it is subscribed. */
async function openPage(port, channel) {
  await e2e.browser.navigate(`http://127.0.0.1:${port}/?channel=${channel}&connect`);
  return e2e.browser.waitDemo(`the page on ${port} to subscribe to ${channel}`, (d) =>
    d.state === "OPEN" && d.subscribed.length === 1,
  );
}

/** Every message of `channel` that the page received was published once, and in order. */
function assertExactlyOnce(demo, channel, total) {
  const messages = demo.messages.filter((m) => m.channel === channel);
  assert.deepEqual(messages.map((m) => m.data), upTo(total), "every message once, in order");
  assert.deepEqual(messages.map((m) => m.seq), upTo(total), "seq 1 ... n with no gap");
}

/** Waits until the Redis of `url` holds the session, so that a crash cannot lose it. */
function waitSessionSaved(redis, session) {
  return waitFor(`session ${session} in Redis`, () =>
    execFileSync("redis-cli", ["-p", String(redis.port), "EXISTS", `bgw:session:{${session}}`])
      .toString()
      .trim() === "1",
  );
}

test("embedded broker: the page receives messages; after a restart it reports recovered: false", { timeout: TIMEOUT }, async () => {
  const gw = await e2e.lab.gateway();
  await openPage(gw.port, "news");
  for (const n of upTo(3)) await gw.publish("news", n);
  let demo = await e2e.browser.waitDemo("3 messages", (d) => d.messages.length === 3);
  assert.deepEqual(demo.messages, upTo(3).map((n) => ({ channel: "news", seq: n, data: n })));

  await gw.stop("SIGKILL");
  const again = await e2e.lab.gateway({ port: gw.port, adminPort: gw.adminPort });
  demo = await e2e.browser.waitDemo("the page to reconnect", (d) =>
    d.state === "OPEN" && d.subscribed.length === 2,
  );
  // The embedded broker's sessions and history died with the process.
  assert.equal(demo.welcomes[1].resumed, false);
  const { channel, seq, recovered, resumed } = demo.subscribed[1];
  assert.deepEqual({ channel, seq, recovered, resumed }, {
    channel: "news",
    seq: 0,
    recovered: false,
    resumed: false,
  });
  assert.notEqual(demo.subscribed[1].epoch, demo.subscribed[0].epoch, "a new epoch");
  assert.ok(demo.reconnects.length >= 1 && demo.reconnects.every((r) => r.code !== 1001));

  await again.publish("news", 4);
  demo = await e2e.browser.waitDemo("the message after the restart", (d) => d.messages.length === 4);
  assert.deepEqual(demo.messages[3], { channel: "news", seq: 1, data: 4 });
  assert.deepEqual(demo.errors, []);
});

for (const signal of ["SIGKILL", "SIGTERM"]) {
  test(`Redis: a node stopped with ${signal} and started again on its port, while messages are published: every message exactly once`, { timeout: TIMEOUT }, async () => {
    const redis = await e2e.lab.redis();
    const flags = [
      "--redis-url", redis.url,
      "--drain-delay", "0s",
      "--drain-window", "200ms",
      "--drain-timeout", "5s",
    ];
    const node = await e2e.lab.gateway({ flags });
    // Another node of the cluster, on the same Redis, publishes all along.
    const publisher = await e2e.lab.gateway({ flags });
    const channel = `restart.${signal}`;
    let demo = await openPage(node.port, channel);
    await waitSessionSaved(redis, demo.welcomes[0].session);

    const published = publishing(() => publisher, channel);
    await e2e.browser.waitDemo("messages before the stop", (d) => d.messages.length >= 5);
    await node.stop(signal);
    const down = published.last;
    await waitFor("messages published while the node is down", () => published.last >= down + 5);
    await e2e.lab.gateway({ port: node.port, adminPort: node.adminPort, flags });
    demo = await e2e.browser.waitDemo("the page to resume", (d) => d.state === "OPEN" && d.welcomes.length === 2);
    const resumed = published.last;
    await waitFor("messages published after the resume", () => published.last >= resumed + 5);
    const total = await published.stop();
    demo = await e2e.browser.waitDemo(`all ${total} messages`, (d) => d.messages.length >= total);

    assertExactlyOnce(demo, channel, total);
    assert.equal(demo.welcomes[1].resumed, true, "the session lives in Redis");
    assert.deepEqual(demo.subscribed.map((s) => s.recovered), [true, true]);
    assert.deepEqual(demo.errors, []);
  });
}

test("a draining node (close 1001): the page resumes on another node at once", { timeout: TIMEOUT }, async () => {
  const redis = await e2e.lab.redis();
  const drain = ["--drain-delay", "100ms", "--drain-window", "100ms", "--drain-timeout", "5s"];
  const a = await e2e.lab.gateway({ flags: ["--redis-url", redis.url, "--node-id", "drain-a", ...drain] });
  const b = await e2e.lab.gateway({ flags: ["--redis-url", redis.url, "--node-id", "drain-b"] });
  // A load balancer in front: the page and its WebSocket go through it.
  const lb = await e2e.lab.proxy(a.port);
  let demo = await openPage(lb.port, "drain");
  assert.equal(demo.node, "drain-a");

  const published = publishing(() => b, "drain");
  await e2e.browser.waitDemo("messages before the drain", (d) => d.messages.length >= 5);
  lb.retarget(b.port); // the load balancer saw /readyz fail
  await a.stop("SIGTERM");
  demo = await e2e.browser.waitDemo("the page to resume on drain-b", (d) =>
    d.state === "OPEN" && d.welcomes.length === 2,
  );
  const resumed = published.last;
  await waitFor("messages published after the resume", () => published.last >= resumed + 5);
  const total = await published.stop();
  demo = await e2e.browser.waitDemo(`all ${total} messages`, (d) => d.messages.length >= total);

  // One reconnect, chosen by the 1001 and without a backoff: within the drain jitter (500 ms),
  // where a backoff would have waited 500 ms to 1.5 s; its first attempt succeeded.
  assert.equal(demo.reconnects.length, 1, JSON.stringify(demo.reconnects));
  assert.equal(demo.reconnects[0].code, 1001);
  assert.ok(demo.reconnects[0].delay < 500, `delay ${demo.reconnects[0].delay}`);
  assert.deepEqual(
    demo.welcomes.map((w) => [w.node, w.resumed]),
    [["drain-a", false], ["drain-b", true]],
  );
  assertExactlyOnce(demo, "drain", total);
  assert.deepEqual(demo.errors, []);
});

test("presence: a page that asks sees the other pages of a presence channel join and leave", { timeout: TIMEOUT }, async () => {
  const gw = await e2e.lab.gateway({ flags: ["--presence", "room.*"] });
  const page = (presence) =>
    `http://127.0.0.1:${gw.port}/?channel=room.e2e&shared=false&connect${presence ? "&presence" : ""}`;
  const watcher = await e2e.browser.newTab();
  await watcher.navigate(page(true));
  let seen = await watcher.waitDemo("its own join", (d) => d.presence.length === 1);
  const own = seen.presence[0];
  assert.deepEqual({ ...own, client: "" }, { type: "join", channel: "room.e2e", user: "", client: "", count: 1 });
  assert.match(own.client, /^[0-9a-f]{16}$/);

  const other = await e2e.browser.newTab();
  await other.navigate(page(false));
  await other.waitDemo("the other page to subscribe", (d) => d.state === "OPEN" && d.subscribed.length === 1);
  seen = await watcher.waitDemo("the other page's join", (d) => d.presence.length === 2);
  const joined = seen.presence[1];
  assert.equal(joined.type, "join");
  assert.equal(joined.count, 2);
  assert.notEqual(joined.client, own.client);
  const session = (await other.demo()).session;
  assert.ok(!JSON.stringify(seen.presence).includes(session), "no session id in presence frames");
  await gw.publish("room.e2e", 1);
  const asked = await other.waitDemo("the message", (d) => d.messages.length === 1);
  assert.deepEqual(asked.presence, [], "a page that did not ask gets no join or leave");

  await other.close();
  seen = await watcher.waitDemo("the other page's leave", (d) => d.presence.length === 3);
  assert.deepEqual(seen.presence[2], { ...joined, type: "leave", count: 1 });
  assert.deepEqual(seen.errors, []);
  await watcher.close();
});
