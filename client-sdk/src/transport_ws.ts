// WebSocket: one socket per (server, token) carries every watched id.

import { WS_SLOW_CONSUMER } from "./codes.js";
import { HttpError, url, type Transport, type TransportOptions } from "./transport.js";

const CODES: Record<string, number> = { forbidden: 403, not_found: 404, bad_request: 400 };

class Shared {
  readonly socket: WebSocket;
  readonly subs = new Map<string, TransportOptions>();
  private opened = false;
  closed = false;

  constructor(private readonly key: string, baseUrl: string, token: string) {
    this.socket = new WebSocket(url(baseUrl.replace(/^http/, "ws"), "/v1/ws", { token }));
    this.socket.onopen = () => {
      this.opened = true;
      for (const o of this.subs.values()) this.send(o);
    };
    this.socket.onmessage = (msg) => {
      const m = JSON.parse(String(msg.data));
      const o = this.subs.get(m.id);
      if (!o) return;
      if (m.op === "error") {
        this.subs.delete(m.id);
        o.onClose(new HttpError(CODES[m.code] ?? 400, m.message));
      } else {
        o.onEvent(m.data);
      }
    };
    this.socket.onclose = (ev) => {
      this.closed = true;
      sockets.delete(this.key);
      const why = !this.opened
        ? new HttpError(0, "the WebSocket did not open")
        : new Error(ev.code === WS_SLOW_CONSUMER ? "fell behind" : `WebSocket closed (${ev.code})`);
      for (const o of this.subs.values()) o.onClose(why);
      this.subs.clear();
    };
  }

  private send(o: TransportOptions): void {
    this.socket.send(JSON.stringify({ op: "subscribe", id: o.id, ...(o.after === undefined ? {} : { after: o.after }) }));
  }

  add(o: TransportOptions): void {
    this.subs.set(o.id, o);
    if (this.opened) this.send(o);
  }

  remove(id: string): void {
    if (!this.subs.delete(id) || this.closed) return;
    if (this.subs.size === 0) this.socket.close(1000);
    else if (this.opened) this.socket.send(JSON.stringify({ op: "unsubscribe", id }));
  }
}

const sockets = new Map<string, Shared>();

export function ws(o: TransportOptions): Transport {
  const key = `${o.baseUrl}\n${o.token}`;
  let shared = sockets.get(key);
  if (!shared || shared.closed) {
    shared = new Shared(key, o.baseUrl, o.token);
    sockets.set(key, shared);
  }
  const mine = shared;
  mine.add(o);
  return { close: () => mine.remove(o.id) };
}
