// The client as an npm package (package.json): what `npm pack` puts in it is what the modules
// import and what the types declare, and the packed module loads.
// Run: node --test gateway/web/test/ (the `npm pack` test needs npm; deploy/test.sh has it)

import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { test } from "node:test";

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(join(WEB, "package.json"), "utf8"));

/** The relative modules that `file` imports or re-exports. */
function imports(file) {
  const source = readFileSync(join(WEB, file), "utf8");
  return [...source.matchAll(/^(?:import|export)\s[^;]*?from\s+"\.\/([^"]+)"/gms)].map((m) => m[1]);
}

test("the package holds every module the client imports, and what its exports name", () => {
  const files = new Set(pkg.files);
  const entries = ["client.js", "shared-worker.js"];
  const reached = new Set();
  for (const queue = [...entries]; queue.length > 0; ) {
    const file = queue.pop();
    if (reached.has(file)) continue;
    reached.add(file);
    queue.push(...imports(file));
  }
  // The worker is loaded by URL, not imported: its name is in client.js all the same.
  assert.match(readFileSync(join(WEB, "client.js"), "utf8"), /new URL\("\.\/shared-worker\.js", import\.meta\.url\)/);
  assert.deepEqual([...reached].sort(), [...files].filter((f) => f.endsWith(".js")).sort());
  assert.equal(pkg.type, "module");
  assert.deepEqual(pkg.exports["."], { types: "./client.d.ts", default: "./client.js" });
  assert.ok(files.has("client.d.ts") && pkg.types === "./client.d.ts");
  assert.equal(pkg.exports["./shared-worker.js"], "./shared-worker.js");
});

test("client.js exports at run time exactly the values client.d.ts declares", async () => {
  const declared = [...readFileSync(join(WEB, "client.d.ts"), "utf8").matchAll(
    /^export (?:const|class|function) (\w+)/gm,
  )].map((m) => m[1]);
  const exported = Object.keys(await import(pathToFileURL(join(WEB, "client.js")).href));
  assert.deepEqual(exported.sort(), declared.sort());
});

test("npm pack: a package with the client's files that a module can import", (t) => {
  if (spawnSync("npm", ["--version"]).status !== 0) {
    t.skip("npm is not installed");
    return;
  }
  const dir = mkdtempSync(join(tmpdir(), "bgw-pack-"));
  try {
    const [packed] = JSON.parse(
      execFileSync("npm", ["pack", "--json", "--pack-destination", dir], { cwd: WEB, encoding: "utf8" }),
    );
    assert.equal(packed.name, pkg.name);
    assert.deepEqual(packed.files.map((f) => f.path).sort(), [...pkg.files, "package.json"].sort());
    execFileSync("tar", ["-xzf", join(dir, packed.filename), "-C", dir]);
    const script = `
      import { Client, DEFAULTS } from ${JSON.stringify(pathToFileURL(join(dir, "package", "client.js")).href)};
      const client = new Client({ url: "ws://gw.test/ws", shared: false, WebSocket: class {} });
      console.log(JSON.stringify([client.sharing, client.state, DEFAULTS.maxDelay]));`;
    const out = execFileSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8" });
    assert.deepEqual(JSON.parse(out), ["none", "CLOSED", 30000]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
