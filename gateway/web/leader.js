// Sharing a connection without a SharedWorker (Safari on iOS, Chrome on Android): the tabs of an
// origin elect a leader with a Web Lock named after the gateway URL; the leader runs the hub and
// the WebSocket, and the other tabs (followers) reach it over a BroadcastChannel of that name.
//
// - Each tab holds a lock of its own (`tabLockName`) while it lives; the leader waits on the locks
//   of the tabs that joined, and is granted one when its tab is gone, closed or crashed.
// - When the leader is gone, its lock goes to the next tab that asked for it. That tab runs a new
//   hub and resumes the session from what every tab saw on the channel (`Mirror`): the session
//   id, and the position of every channel that the leader sent to other tabs. The other tabs join
//   it again with their own positions; a position lower than a tab's own only replays what that
//   tab drops by seq, so every tab gets every message once, in order.
// - Requests a follower sent to a leader that is gone fail with `connection_lost`, as on a lost
//   socket.
//
// On the channel, a follower's frame carries `from` (its tab id); a hub's frame carries `leader`
// (the leader's tab id) and `to` (the tab ids it is for, or null for every tab).

import { connectionOptions, Hub, tabLockName } from "./hub.js";

/** What a follower saw of the shared connection: enough for it to take the connection over. */
export class Mirror {
  constructor() {
    this.session = null;
    /** The connection's position on each channel it sent to some tab: `{seq, epoch}`. */
    this.positions = new Map();
  }

  /** A hub's frame, whichever tab it was for. */
  observe(msg) {
    if (msg.type === "released") {
      this.positions.delete(msg.channel);
      return;
    }
    if (msg.type !== "event") return;
    const { name, event } = msg;
    if (name === "welcome") {
      this.session = event.session;
    } else if (name === "subscribed") {
      this.positions.set(event.channel, { seq: event.start, epoch: event.epoch });
    } else if (name === "message") {
      const epoch = this.positions.get(event.channel)?.epoch ?? null;
      this.positions.set(event.channel, { seq: event.seq, epoch });
    }
  }

  /** The session and positions to resume, or undefined when no session was seen. */
  seed() {
    if (this.session === null) return undefined;
    const positions = {};
    for (const [channel, { seq, epoch }] of this.positions) {
      if (seq !== null) positions[channel] = epoch === null ? { seq } : { seq, epoch };
    }
    return { session: this.session, positions };
  }
}

export class LeaderTransport {
  /** `locks`: a LockManager; `BroadcastChannel`: its constructor (both injectable for tests). */
  constructor(client, options, { locks, BroadcastChannel }) {
    this.client = client;
    this.options = options;
    this.locks = locks;
    /** The name of the leader's lock and of the channel: one of each per gateway URL. */
    this.name = `bgw ${client.url}`;
    this.channel = new BroadcastChannel(this.name);
    this.channel.onmessage = ({ data }) => this.receive(data);
    this.mirror = new Mirror();
    /** The tab id of the leader this tab follows (its own when it leads), null until known. */
    this.leader = null;
    /** The hub, while this tab leads. */
    this.hub = null;
    /** Whether this tab holds its own lock: the leader may only watch it from then on. */
    this.holding = false;
    this.started = false;
    /** The tabs whose lock the leader waits on. */
    this.watched = new Set();
  }

  get sharing() {
    return this.hub ? "leader" : "follower";
  }

  get ready() {
    return this.holding && this.leader !== null;
  }

  get local() {
    return this.hub !== null;
  }

  /** Takes part, from the first `connect()`: holds the tab's lock, then asks to lead. */
  start() {
    if (this.started) return;
    this.started = true;
    this.client.holdTabLock(this.locks).then(() => {
      this.holding = true;
      if (this.leader !== null) this.client.hubChanged();
      this.channel.postMessage({ op: "who", from: this.client.id });
      this.locks.request(this.name, () => this.lead());
    });
  }

  post(msg) {
    if (this.hub) this.hub.receive(this.client.id, msg);
    else this.channel.postMessage({ ...msg, from: this.client.id });
  }

  receive(msg) {
    if (msg.from !== undefined) {
      if (this.hub) this.fromFollower(msg);
      return;
    }
    this.mirror.observe(msg);
    if (this.hub) return; // a former leader's last frames
    if (msg.type === "leader") {
      if (msg.leader === this.leader) return;
      this.leader = msg.leader;
      if (this.ready) this.client.hubChanged();
      return;
    }
    if (msg.leader !== this.leader) return;
    if (msg.to === null || msg.to.includes(this.client.id)) this.client.receive(msg);
  }

  fromFollower(msg) {
    if (msg.op === "who") {
      this.channel.postMessage({ type: "leader", leader: this.client.id, to: [msg.from] });
      return;
    }
    if (msg.op === "join") this.watch(msg.from);
    this.hub.receive(msg.from, msg);
  }

  /** This tab got the lock: it runs the hub until it ends. */
  lead() {
    const self = this.client.id;
    this.hub = new Hub(
      connectionOptions(this.options),
      {
        send: (ids, msg) => {
          const remote = ids.filter((id) => id !== self);
          // Followers first: what the leader's own listeners do next comes after it for them too.
          if (remote.length > 0) this.channel.postMessage({ ...msg, leader: self, to: remote });
          if (remote.length < ids.length) this.client.receive(msg);
        },
        released: (channel) => {
          this.channel.postMessage({ type: "released", channel, leader: self, to: [] });
        },
      },
      this.mirror.seed(),
    );
    this.leader = self;
    this.channel.postMessage({ type: "leader", leader: self, to: null });
    this.client.hubChanged();
    return new Promise(() => {}); // the lock is held for the life of the tab
  }

  /** Waits on a follower's lock: it is granted when the follower is gone. */
  watch(tab) {
    if (this.watched.has(tab)) return;
    this.watched.add(tab);
    this.locks.request(tabLockName(tab), () => {
      this.watched.delete(tab);
      this.hub.detach(tab);
    });
  }
}
