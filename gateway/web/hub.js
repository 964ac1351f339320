// The hub: one Connection (connection.js) shared by the tabs of an origin that use the same URL,
// wherever it runs: in a shared worker (shared-worker.js), in the tab elected to connect for the
// others (leader.js), or in a tab on its own (client.js).
//
// It counts the tabs that want each channel (the connection unsubscribes when the last one
// leaves), sends each message and `subscribed` to the tabs of its channel, each publish reply to
// the tab that asked, and connection events to every tab that joined; it asks one tab for the
// token. It reaches tabs only through `ports.send(tabIds, message)`, so it runs the same over a
// function call, MessagePorts or a BroadcastChannel, and tests drive it with plain functions.
//
// Tab to hub, `{op, ...}`: join {channels: {name: since | null}, presence: [name], token,
// offline}, leave, subscribe {channel, since, presence}, unsubscribe {channel},
// publish {id, channel, data},
// refresh {id, token}, token {token}, tokenReply {req, token | error}, check, online, offline.
// Hub to tab: {type: "event", name, event}, {type: "reply", id, value | error},
// {type: "token", req}. A token is described as {kind: "none" | "value" | "callback", value?,
// call?, local?}: `call` only from a tab in the same context as the hub.

import { CLOSED, Connection, OPEN, RECONNECTING } from "./connection.js";

/** The name of the Web Lock a tab holds while it lives: whoever else gets it knows it is gone. */
export const tabLockName = (tab) => `bgw tab ${tab}`;

/** Requests the Web Lock `name` and holds it for the life of this context. */
export function holdLock(locks, name) {
  return new Promise((resolve) => {
    locks.request(name, () => {
      resolve();
      return new Promise(() => {});
    });
  });
}

/** The options of a connection run by a hub in the tab's own context. */
export function connectionOptions(options) {
  const { token: _token, shared: _shared, workerUrl: _workerUrl, ...rest } = options;
  return rest;
}

/**
 * The holder of a handed-over connection's channels until the tabs that want them join again:
 * without it the connection would drop them, and their positions, before the tabs are back.
 */
const HANDOVER = "handover";

/** A ClientError (or any error) as plain fields, to cross a port and become a ClientError again. */
export function errorFields(e) {
  const fields = { code: e?.code ?? "internal", message: String(e?.message ?? e) };
  for (const key of ["status", "channel", "closeCode", "reason"]) {
    if (e?.[key] !== undefined) fields[key] = e[key];
  }
  return fields;
}

/**
 * Applies a `subscribed` event of the shared connection to a tab's subscription `sub`
 * (`{seq, epoch, active}`: the tab's last position, and whether it was subscribed already);
 * returns whether this tab missed nothing (its `recovered`).
 *
 * `start` is where the shared connection's delivery goes on. The hub subscribes again from a
 * tab's older position of the same sequence (`behind`); a tab whose position the delivery still
 * does not cover (one of another epoch) is told it missed messages, exactly as a connection of
 * its own would have told it.
 */
export function applySubscribed(sub, { seq, epoch, recovered, resumed, start }) {
  let covered = recovered;
  if (!recovered) {
    sub.seq = seq;
  } else if (sub.active || resumed) {
    // Delivery goes on from this tab's own position: what it has seen is dropped by seq. A
    // session restored without the tab's position replays from the one the gateway stored.
    if (sub.seq === null && !resumed) sub.seq = start ?? seq;
  } else if (sub.seq === null) {
    sub.seq = start ?? seq;
  } else if (sub.seq < (start ?? seq) || (sub.epoch !== null && sub.epoch !== epoch)) {
    sub.seq = start ?? seq;
    covered = false;
  }
  sub.epoch = epoch;
  sub.active = true;
  return covered;
}

/** Whether position `since` (a tab's) is before `sub` (the connection's) in the same sequence. */
function behind(since, sub) {
  if (!since || sub.seq === null || since.seq >= sub.seq) return false;
  return since.epoch === undefined || sub.epoch === null || since.epoch === sub.epoch;
}

export class Hub {
  /**
   * `options`: those of the Connection (its token comes from the tabs). `ports.send(ids, msg)`
   * delivers to tabs; `ports.released?.(channel)` hears that the connection dropped a channel.
   * `seed` (`{session, positions}`) resumes the connection another hub ran.
   */
  constructor(options, ports, seed) {
    this.ports = ports;
    this.connection = new Connection({ ...options, token: () => this.token() });
    /** Every tab that spoke: `{id, joined, channels, token, tokenOrder}`. */
    this.tabs = new Map();
    /** The tabs that want each channel; the connection holds exactly these channels. */
    this.holders = new Map();
    /** The last `welcome`, for tabs that join an open connection. */
    this.welcome = null;
    /** Token requests sent to a tab: `{tab, resolve, reject}` by request number. */
    this.tokenRequests = new Map();
    this.nextTokenRequest = 1;
    /** Orders the tabs by when they last supplied a token: the latest is asked first. */
    this.tokenOrder = 0;
    this.listen();
    if (seed) this.restore(seed);
  }

  listen() {
    const c = this.connection;
    c.on("state", ({ state }) => this.toJoined("state", { state }));
    c.on("welcome", (welcome) => {
      this.welcome = welcome;
      this.toJoined("welcome", welcome);
    });
    c.on("reconnect", (reconnect) => this.toJoined("reconnect", reconnect));
    c.on("subscribed", (subscribed) => {
      // `start`: where the connection's delivery goes on, so that each tab can tell whether
      // that covers the position it asked for (`applySubscribed`).
      const start = c.channels.get(subscribed.channel)?.seq ?? null;
      this.toChannel(subscribed.channel, "subscribed", { ...subscribed, start });
    });
    c.on("message", (message) => this.toChannel(message.channel, "message", message));
    for (const name of ["join", "leave"]) {
      c.on(name, (event) =>
        this.toChannel(event.channel, name, event, (tab) => tab.presence.has(event.channel)),
      );
    }
    c.on("error", (e) => {
      const error = errorFields(e);
      if (error.channel === undefined) return this.toJoined("error", error);
      // A refused subscription: its tabs forget the channel, as the connection did.
      this.toChannel(error.channel, "error", error);
      for (const id of this.holders.get(error.channel) ?? []) {
        this.tabs.get(id)?.channels.delete(error.channel);
      }
      this.holders.delete(error.channel);
      this.ports.released?.(error.channel);
    });
  }

  /** A frame from tab `id`. */
  receive(id, msg) {
    switch (msg.op) {
      case "join":
        return this.join(id, msg);
      case "leave":
        return this.leave(id);
      case "subscribe": {
        const tab = this.tabs.get(id);
        return tab?.joined && this.add(tab, msg.channel, msg.since, msg.presence);
      }
      case "unsubscribe": {
        const tab = this.tabs.get(id);
        if (!tab?.channels.has(msg.channel)) return undefined;
        this.remove(tab, msg.channel);
        return this.send([id], "unsubscribed", { channel: msg.channel });
      }
      case "publish":
        return this.answer(id, msg.id, this.connection.publish(msg.channel, msg.data));
      case "refresh":
        this.setToken(id, { kind: "value", value: msg.token });
        return this.answer(id, msg.id, this.connection.refresh(msg.token));
      case "token":
        this.setToken(id, msg.token);
        return this.connection.tokenChanged();
      case "tokenReply":
        return this.tokenReply(msg);
      case "check":
        return this.connection.check();
      case "offline":
        return this.connection.wentOffline();
      case "online":
        return this.connection.cameOnline();
      default:
        return undefined;
    }
  }

  /**
   * A tab connects, or tells a new hub what it holds: `channels` maps each of its channels to
   * its position (or null). It is the whole state of the tab, so it may come again.
   */
  join(id, { channels, presence = [], token, offline }) {
    const tab = this.tab(id);
    tab.joined = true;
    this.setToken(id, token);
    if (offline) this.connection.wentOffline();
    const state = this.connection.state;
    if (state === OPEN && this.welcome) this.send([id], "welcome", this.welcome);
    for (const channel of [...tab.channels]) {
      if (!(channel in channels)) this.remove(tab, channel);
    }
    for (const [channel, since] of Object.entries(channels)) {
      this.add(tab, channel, since, presence.includes(channel));
    }
    // A connection being attempted is left alone: tabs join one by one.
    if (state === CLOSED || state === RECONNECTING) this.connection.connect();
    else this.send([id], "state", { state });
  }

  /** A tab closes its client; the connection closes with the last one. */
  leave(id) {
    const tab = this.tabs.get(id);
    if (tab) tab.joined = false;
    // Closed first, so that dropping the channels sends no unsubscribe to a closing connection.
    if (!this.anyJoined()) this.connection.close();
    for (const channel of [...(tab?.channels ?? [])]) this.remove(tab, channel);
    this.askAgain(id);
  }

  /** A tab is gone (its page closed or crashed). */
  detach(id) {
    this.leave(id);
    this.tabs.delete(id);
  }

  tab(id) {
    let tab = this.tabs.get(id);
    if (!tab) {
      tab = {
        id,
        joined: false,
        channels: new Set(),
        /** The channels whose `join` and `leave` this tab asked for. */
        presence: new Set(),
        token: { kind: "none" },
        tokenOrder: 0,
      };
      this.tabs.set(id, tab);
    }
    return tab;
  }

  anyJoined() {
    for (const tab of this.tabs.values()) if (tab.joined) return true;
    return false;
  }

  add(tab, channel, since, presence = false) {
    if (tab.channels.has(channel)) return;
    tab.channels.add(channel);
    if (presence) tab.presence.add(channel);
    let holders = this.holders.get(channel);
    if (!holders) this.holders.set(channel, (holders = new Set()));
    holders.add(tab.id);
    const sub = this.connection.channels.get(channel);
    if (!sub) return this.connection.subscribe(channel, { since: since ?? undefined, presence });
    // Held without the presence frames this tab wants: subscribed again with them.
    if (presence && !sub.presence) return this.connection.askPresence(channel);
    // Held already, from a later position than this tab's (it joins a new leader that saw more
    // than it did, or asks for retained messages): the connection replays from this tab's, and
    // its `subscribed` reaches this tab too.
    if (behind(since, sub)) return this.connection.rewind(channel, since);
    // Held already: this tab starts where the connection is. Until the connection confirms the
    // subscription, its `subscribed` reaches this tab too.
    if (sub.confirmed && tab.joined) {
      const { seq, epoch } = sub;
      this.send([tab.id], "subscribed", {
        channel,
        seq,
        epoch,
        recovered: true,
        resumed: false,
        start: seq,
      });
    }
  }

  remove(tab, channel) {
    if (!tab.channels.delete(channel)) return;
    tab.presence.delete(channel);
    const holders = this.holders.get(channel);
    holders.delete(tab.id);
    if (holders.size > 0) return;
    this.holders.delete(channel);
    this.connection.unsubscribe(channel);
    this.ports.released?.(channel);
  }

  /** Takes over a connection from its last known session and positions. */
  restore({ session, positions }) {
    this.connection.restore(session, positions);
    const holder = this.tab(HANDOVER);
    for (const channel of Object.keys(positions)) this.add(holder, channel);
    // Tabs join again within moments; what none claims by then is dropped.
    this.connection.clock.setTimeout(
      () => this.detach(HANDOVER),
      this.connection.options.handoverGrace,
    );
  }

  // --- tokens -------------------------------------------------------------------------------

  setToken(id, token) {
    const tab = this.tab(id);
    tab.token = token ?? { kind: "none" };
    tab.tokenOrder = ++this.tokenOrder;
  }

  /**
   * The token for the next connection: from a tab in the hub's own context where one has a
   * token (the leader's), else from the joined tab that supplied one last.
   */
  token() {
    let best = null;
    const rank = (tab) => [tab.token.local ? 1 : 0, tab.tokenOrder];
    for (const tab of this.tabs.values()) {
      if (!tab.joined || tab.token.kind === "none") continue;
      if (!best) best = tab;
      else {
        const [a, b] = [rank(tab), rank(best)];
        if (a[0] > b[0] || (a[0] === b[0] && a[1] > b[1])) best = tab;
      }
    }
    if (!best) return undefined;
    const { kind, value, call } = best.token;
    if (kind === "value") return value;
    if (call) return call();
    return new Promise((resolve, reject) => {
      const req = this.nextTokenRequest++;
      this.tokenRequests.set(req, { tab: best.id, resolve, reject });
      this.ports.send([best.id], { type: "token", req });
    });
  }

  tokenReply({ req, token, error }) {
    const request = this.tokenRequests.get(req);
    if (!request) return;
    this.tokenRequests.delete(req);
    if (error !== undefined) request.reject(new Error(error));
    else request.resolve(token);
  }

  /** The tab asked for a token is gone: ask the next one. */
  askAgain(id) {
    for (const [req, request] of this.tokenRequests) {
      if (request.tab !== id) continue;
      this.tokenRequests.delete(req);
      try {
        request.resolve(this.token());
      } catch (e) {
        request.reject(e);
      }
    }
  }

  // --- to the tabs --------------------------------------------------------------------------

  answer(id, requestId, reply) {
    reply.then(
      (value) => this.ports.send([id], { type: "reply", id: requestId, value }),
      (e) => this.ports.send([id], { type: "reply", id: requestId, error: errorFields(e) }),
    );
  }

  send(ids, name, event) {
    if (ids.length > 0) this.ports.send(ids, { type: "event", name, event });
  }

  toJoined(name, event) {
    const ids = [];
    for (const tab of this.tabs.values()) if (tab.joined) ids.push(tab.id);
    this.send(ids, name, event);
  }

  /** To the joined tabs that hold `channel` (and that `wants` it, when given). */
  toChannel(channel, name, event, wants = () => true) {
    const ids = [];
    for (const id of this.holders.get(channel) ?? []) {
      const tab = this.tabs.get(id);
      if (tab?.joined && wants(tab)) ids.push(id);
    }
    this.send(ids, name, event);
  }
}
