// The end-to-end harness: real redis-server and gateway processes on free loopback ports, a
// loopback TCP proxy (a load balancer whose target the test moves), and Debian's chromium driven
// through chromedriver's WebDriver HTTP API with plain fetch (no dependencies).
//
// Every process is started here and killed by its pid at the end; nothing else is touched.
// Every wait polls a condition until a deadline, and fails with what it waited for.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** 1, 2 ... n. */
export const upTo = (n) => Array.from({ length: n }, (_, i) => i + 1);

/**
 * The lab and the browser of a test file, started before its tests and stopped after them:
 * `e2e.lab` and `e2e.browser` once the tests run.
 */
export function labForTheFile() {
  const e2e = { lab: null, browser: null };
  before(async () => {
    e2e.lab = new Lab();
    e2e.browser = await e2e.lab.browser();
  });
  after(async () => {
    try {
      await e2e.browser?.quit();
    } finally {
      await e2e.lab.cleanup();
    }
  });
  return e2e;
}

/** How long any one wait may take: generous, for a loaded 2-core machine. */
export const DEADLINE = 20_000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns a truthy value, which it returns; fails after `deadline`. */
export async function waitFor(what, check, deadline = DEADLINE) {
  const until = Date.now() + deadline;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > until) {
      throw new Error(`timed out after ${deadline} ms waiting for ${what}${last ? `: ${last}` : ""}`);
    }
    await sleep(50);
  }
}

/** A loopback port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Whether something accepts TCP connections on the loopback port. */
function accepting(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** The processes, directories and servers a test run started, to end at its end. */
export class Lab {
  constructor() {
    this.children = new Set();
    this.dirs = [];
    this.servers = [];
  }

  tempDir(prefix) {
    const dir = mkdtempSync(join(tmpdir(), `bgw-e2e-${prefix}-`));
    this.dirs.push(dir);
    return dir;
  }

  /** Spawns `command`, keeping its stderr (and stdout) for the failure message. */
  spawn(command, args, options = {}) {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"], ...options });
    child.logs = "";
    child.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
    child.exited.then(() => this.children.delete(child));
    for (const stream of [child.stdout, child.stderr]) {
      stream.setEncoding("utf8");
      stream.on("data", (text) => {
        child.logs = (child.logs + text).slice(-20_000);
      });
    }
    this.children.add(child);
    return child;
  }

  /** Kills what is still running, by pid, and removes the temporary directories. */
  async cleanup() {
    for (const server of this.servers) server.close();
    for (const child of [...this.children]) {
      try {
        process.kill(child.pid, "SIGKILL");
      } catch {
        // already gone
      }
      await child.exited;
    }
    for (const dir of this.dirs) rmSync(dir, { recursive: true, force: true });
  }

  /** A redis-server with the append-only file on, so that its data outlives a restart. */
  async redis() {
    const port = await freePort();
    const dir = this.tempDir("redis");
    const child = this.spawn("redis-server", [
      "--port", String(port),
      "--bind", "127.0.0.1",
      "--appendonly", "yes",
      "--save", "",
      "--dir", dir,
    ]);
    await waitFor(`redis-server on ${port}`, () => accepting(port));
    return { child, port, url: `redis://127.0.0.1:${port}` };
  }

  /**
   * A gateway node on the given (or free) ports; resolves once it listens. A free port can be
   * taken by another process before the node binds it: then other free ports are tried.
   */
  async gateway({ port, adminPort, flags = [] } = {}) {
    const chosen = port === undefined && adminPort === undefined;
    for (let attempt = 1; ; attempt++) {
      const client = port ?? (await freePort());
      const admin = adminPort ?? (await freePort());
      const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("BGW_")));
      env.BGW_LOG = "info,gateway=debug";
      const child = this.spawn(
        gatewayBinary(),
        ["--listen", `127.0.0.1:${client}`, "--admin-listen", `127.0.0.1:${admin}`, ...flags],
        { env },
      );
      const listening = await waitFor(`the gateway on ${client} to listen`, () => {
        if (child.exitCode !== null) {
          if (chosen && attempt < 5 && /Address already in use/.test(child.logs)) return "taken";
          throw new Error(`it exited: ${child.logs}`);
        }
        return / listening /.test(child.logs) && "listening";
      });
      if (listening === "listening") return new Gateway(child, client, admin);
    }
  }

  /**
   * A TCP proxy on a free loopback port to `127.0.0.1:target`, like a load balancer: `retarget`
   * sends new connections elsewhere; connections already open stay where they are.
   */
  async proxy(target) {
    const proxy = { target, port: 0, retarget: (port) => (proxy.target = port) };
    const sockets = new Set();
    const server = net.createServer((downstream) => {
      const upstream = net.connect(proxy.target, "127.0.0.1");
      for (const [a, b] of [[downstream, upstream], [upstream, downstream]]) {
        sockets.add(a);
        a.pipe(b);
        a.on("error", () => b.destroy());
        a.on("close", () => {
          sockets.delete(a);
          b.destroy();
        });
      }
    });
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    proxy.port = server.address().port;
    this.servers.push({ close: () => { server.close(); for (const s of sockets) s.destroy(); } });
    return proxy;
  }

  /**
   * chromedriver on a free port. It binds the wildcard address, IPv4 and IPv6, which a port in
   * use by any local socket refuses (a busy machine's outgoing connections take ports from the
   * same range): it exits then, and another port is tried.
   */
  async chromedriver() {
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      const driver = this.spawn("chromedriver", [`--port=${port}`, "--allowed-ips=127.0.0.1"]);
      const base = `http://127.0.0.1:${port}`;
      const ready = await waitFor("chromedriver", async () => {
        if (driver.exitCode !== null) return "exited";
        return (await (await fetch(`${base}/status`)).json()).value.ready && "ready";
      });
      if (ready === "ready") return { driver, base };
      if (attempt === 5) throw new Error(`chromedriver exited 5 times; last: ${driver.logs}`);
    }
  }

  /** Chromium, headless, with a fresh profile, driven by chromedriver. */
  async browser() {
    const { driver, base } = await this.chromedriver();
    const args = [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
      "--disable-dev-shm-usage",
      `--user-data-dir=${this.tempDir("chromium")}`,
    ];
    const created = await webdriver(base, "POST", "/session", {
      capabilities: {
        alwaysMatch: {
          browserName: "chrome",
          "goog:chromeOptions": { binary: chromiumBinary(), args },
        },
      },
    });
    return new Browser(base, created.sessionId, driver);
  }
}

/** `target/debug/gateway` of the workspace (or `$BGW_E2E_GATEWAY`), built beforehand. */
function gatewayBinary() {
  const target = process.env.CARGO_TARGET_DIR ? resolve(ROOT, process.env.CARGO_TARGET_DIR) : join(ROOT, "target");
  const binary = process.env.BGW_E2E_GATEWAY ?? join(target, "debug", "gateway");
  if (!existsSync(binary)) throw new Error(`no gateway binary at ${binary}: run cargo build -p gateway`);
  return binary;
}

function chromiumBinary() {
  for (const path of ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]) {
    if (existsSync(path)) return path;
  }
  throw new Error("no chromium: apt-get install chromium chromium-driver");
}

export class Gateway {
  constructor(child, port, adminPort) {
    this.child = child;
    this.port = port;
    this.adminPort = adminPort;
  }

  get pid() {
    return this.child.pid;
  }

  /** Sends `signal` and waits for the process to exit. */
  async stop(signal) {
    process.kill(this.child.pid, signal);
    const deadline = sleep(DEADLINE).then(() => {
      throw new Error(`the gateway ${this.pid} did not exit after ${signal}`);
    });
    return Promise.race([this.child.exited, deadline]);
  }

  /** `GET /v1/stats` of the admin listener: `{connections, subscriptions, ...}`. */
  async stats() {
    return (await fetch(`http://127.0.0.1:${this.adminPort}/v1/stats`)).json();
  }

  /** `POST /v1/publish`; resolves with `{channel, seq, epoch}`. */
  async publish(channel, data) {
    const response = await fetch(`http://127.0.0.1:${this.adminPort}/v1/publish`, {
      method: "POST",
      body: JSON.stringify({ channel, data }),
    });
    if (response.status !== 200) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return response.json();
  }
}

/**
 * Publishes 1, 2, 3 ... to `channel` through `node()` (asked anew for every message) until
 * `stop()`. A publish that fails (no node reachable) is tried again: every number is published
 * exactly once, in order.
 */
export function publishing(node, channel) {
  let running = true;
  let last = 0;
  const loop = (async () => {
    while (running) {
      try {
        await node().publish(channel, last + 1);
        last += 1;
      } catch {
        // the node is down: try again
      }
      await sleep(20);
    }
  })();
  return {
    get last() {
      return last;
    },
    async stop() {
      running = false;
      await loop;
      return last;
    },
  };
}

async function webdriver(base, method, path, body) {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const reply = await response.json();
  if (response.status !== 200) {
    throw new Error(`WebDriver ${method} ${path}: ${response.status} ${JSON.stringify(reply.value)}`);
  }
  return reply.value;
}

export class Browser {
  constructor(base, session, driver) {
    this.base = base;
    this.session = session;
    this.driver = driver;
  }

  command(method, path, body) {
    return webdriver(this.base, method, `/session/${this.session}${path}`, body);
  }

  /** A Chrome DevTools Protocol command on the current tab. */
  cdp(cmd, params = {}) {
    return this.command("POST", "/goog/cdp/execute", { cmd, params });
  }

  /**
   * A new tab of this browser (same profile, so same SharedWorkers, locks and channels).
   * `before` is a script that runs in every page it loads, before the page's own scripts.
   */
  async newTab({ before } = {}) {
    // The first window stays open: WebDriver needs a current window after a tab closes.
    this.home ??= await this.command("GET", "/window");
    const { handle } = await this.command("POST", "/window/new", { type: "tab" });
    const tab = new Tab(this, handle);
    if (before) await tab.cdp("Page.addScriptToEvaluateOnNewDocument", { source: before });
    return tab;
  }

  navigate(url) {
    return this.command("POST", "/url", { url });
  }

  /** Runs `script` (a function body) in the page; resolves with what it returns. */
  run(script, ...args) {
    return this.command("POST", "/execute/sync", { script, args });
  }

  /** The demo page's record of what its client reported (`window.demo` of index.html). */
  demo() {
    return this.run(`
      const d = window.demo;
      if (!d) return null;
      return {
        state: d.client.state,
        sharing: d.client.sharing,
        session: d.client.session,
        node: d.client.node,
        messages: d.messages,
        subscribed: d.subscribed,
        presence: d.presence,
        welcomes: d.welcomes,
        reconnects: d.reconnects,
        errors: d.errors,
      };`);
  }

  /** Polls the demo page until `check(demo)` is truthy; returns that demo record. */
  async waitDemo(what, check, deadline) {
    let last = null;
    try {
      return await waitFor(what, async () => {
        last = await this.demo();
        return last && check(last) ? last : null;
      }, deadline);
    } catch (e) {
      e.message += `\nthe page's last record: ${JSON.stringify(last).slice(0, 4000)}`;
      throw e;
    }
  }

  /** A PNG of the page, base64. */
  screenshot() {
    return this.command("GET", "/screenshot");
  }

  /** Ends the session, which ends the browser, then chromedriver. */
  async quit() {
    try {
      await this.command("DELETE", "");
    } finally {
      process.kill(this.driver.pid, "SIGTERM");
      await this.driver.exited;
    }
  }
}

/**
 * One tab of a Browser. WebDriver commands go to the current tab, so each call makes this one
 * current first.
 */
export class Tab {
  constructor(browser, handle) {
    this.browser = browser;
    this.handle = handle;
  }

  async use() {
    if (this.browser.current !== this.handle) {
      await this.browser.command("POST", "/window", { handle: this.handle });
      this.browser.current = this.handle;
    }
    return this.browser;
  }

  async navigate(url) {
    return (await this.use()).navigate(url);
  }

  async run(script, ...args) {
    return (await this.use()).run(script, ...args);
  }

  async cdp(cmd, params) {
    return (await this.use()).cdp(cmd, params);
  }

  async demo() {
    return (await this.use()).demo();
  }

  async waitDemo(what, check, deadline) {
    let last = null;
    try {
      return await waitFor(what, async () => {
        last = await this.demo();
        return last && check(last) ? last : null;
      }, deadline);
    } catch (e) {
      e.message += `\nthe tab's last record: ${JSON.stringify(last).slice(0, 4000)}`;
      throw e;
    }
  }

  /** Crashes the tab's renderer: the page dies without unloading. */
  async crash() {
    try {
      await this.cdp("Page.crash");
    } catch {
      // the command's reply dies with the renderer
    }
  }

  /** Closes the tab, as its user would: the page is unloaded, its locks are released. */
  async close() {
    await this.use();
    await this.browser.command("DELETE", "/window");
    await this.browser.command("POST", "/window", { handle: this.browser.home });
    this.browser.current = this.browser.home;
  }
}
