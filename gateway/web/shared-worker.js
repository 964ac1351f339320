// The SharedWorker of client.js: one connection to the gateway for the tabs of an origin that use
// the same URL (the worker's name says which). Each tab attaches over its MessagePort once it
// holds its own Web Lock; a tab closes without a word, so the worker waits on that lock and is
// granted it when the tab is gone. Everything else goes to the hub (hub.js).

import { Hub, tabLockName } from "./hub.js";

let hub = null;
/** Each attached tab's port, by tab id. */
const ports = new Map();

const send = (ids, msg) => {
  for (const id of ids) ports.get(id)?.postMessage(msg);
};

function attach(port, { tab, options }) {
  ports.set(tab, port);
  // The first tab's options make the connection; the tabs of one URL have the same, most likely.
  hub ??= new Hub(options, { send });
  port.postMessage({ type: "attached" }); // the tab knows the script loaded
  globalThis.navigator?.locks?.request(tabLockName(tab), () => detach(tab));
}

function detach(tab) {
  ports.delete(tab);
  hub?.detach(tab);
}

globalThis.addEventListener("connect", ({ ports: [port] }) => {
  port.onmessage = ({ data }) => {
    if (data.op === "attach") attach(port, data);
    else if (data.op === "detach") detach(data.tab);
    else hub?.receive(data.tab, data);
  };
});

// The worker sees the real network too (the tabs relay theirs, emulated ones included).
globalThis.addEventListener("online", () => hub?.receive(null, { op: "online" }));
globalThis.addEventListener("offline", () => hub?.receive(null, { op: "offline" }));
