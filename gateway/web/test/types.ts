// A program written against client.d.ts, the way an application uses the client: `tsc -p
// gateway/web/test` checks that the declarations hold together and say what the README shows.
// Never run.

import {
  backoffDelay,
  Client,
  ClientError,
  CLOSED,
  DEFAULTS,
  type ErrorCode,
  type Position,
  type Presence,
  type Sharing,
  type State,
} from "../client.js";

const client = new Client({
  url: "wss://example.com/ws",
  token: () => fetch("/token").then((r) => r.text()),
  shared: true,
  workerUrl: new URL("/assets/shared-worker.js", "https://example.com"),
  handoverGrace: 2000,
});
const sharing: Sharing = client.sharing;
const state: State = client.state;
client.on("state", ({ state, previous }) => console.log(previous, "->", state));
client.on("message", ({ channel, seq, data }) => console.log(channel, seq, JSON.stringify(data)));
client.on("subscribed", ({ channel, recovered, resumed }) => {
  if (!recovered) console.warn(channel, resumed);
});
client.on("reconnect", ({ delay, code }) => console.log(delay, code ?? "no close"));
client.on("error", (e) => {
  if (e instanceof ClientError) {
    const code: ErrorCode = e.code;
    console.error(code, e.status, e.channel, e.closeCode);
  }
});
const since: Position = { seq: 41, epoch: "k3f9" };
client.subscribe("news", { since });
client.subscribe("room.1", { presence: true });
client.on("join", ({ channel, user, client: id, count }) => console.log(channel, user, id, count));
client.on("leave", ({ client: id, count }: Presence) => console.log(id, count));
client.connect();
client.publish("news", { hello: ["world", 1, null, true] }).then(({ seq }) => seq + 1);
client.refresh("token").then(({ expires }) => expires ?? 0);
const positions: Record<string, Position> = client.positions();
const off = client.on("welcome", ({ session, node, resumed, heartbeat }) => [session, node, resumed, heartbeat]);
off();
client.close();

new Client({ shared: false, token: "static", maxAttempts: 3 });
console.log(sharing, state, positions, backoffDelay(2), DEFAULTS.maxDelay, CLOSED);

// @ts-expect-error: data is JSON, not a function
client.publish("news", () => 1);
// @ts-expect-error: `shared` is a boolean
new Client({ shared: "worker" });
// @ts-expect-error: `presence` is a boolean
client.subscribe("room.1", { presence: "yes" });
