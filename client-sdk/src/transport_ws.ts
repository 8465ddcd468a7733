// WebSocket: one socket per (server, credential) carries every watched id. The token never
// goes in the URL: the first message is {"op":"auth","token":…}, and each renewed token
// is sent the same way on the open socket. A refused or expired token closes it with 4001.

import { WS_SLOW_CONSUMER, WS_UNAUTHORIZED } from "./codes.js";
import type { Tokens } from "./token.js";
import { HttpError, url, type Transport, type TransportOptions } from "./transport.js";

const CODES: Record<string, number> = { unauthorized: 401, forbidden: 403, not_found: 404, bad_request: 400, too_many_streams: 429 };

class Shared {
  readonly socket: WebSocket;
  readonly subs = new Map<string, TransportOptions>();
  private opened = false;
  private done = false;
  private readonly unlisten: () => void;
  closed = false;

  constructor(private readonly key: string, baseUrl: string, tokens: Tokens) {
    this.socket = new WebSocket(url(baseUrl.replace(/^http/, "ws"), "/v1/ws", {}));
    const auth = (token: string) => this.socket.send(JSON.stringify({ op: "auth", token }));
    this.unlisten = tokens.onRenew((token) => { if (this.opened && !this.closed) auth(token); });
    this.socket.onopen = () => {
      this.opened = true;
      auth(tokens.token);
      for (const o of this.subs.values()) this.send(o);
    };
    this.socket.onmessage = (msg) => {
      const m = JSON.parse(String(msg.data));
      const o = this.subs.get(m.id);
      if (!o) return; // includes errors about the socket itself (id null): its close follows
      if (m.op === "error") {
        this.subs.delete(m.id);
        o.onClose(new HttpError(CODES[m.code] ?? 400, m.message));
      } else {
        o.onEvent(m.data);
      }
    };
    // Browsers follow a failed connect's `error` with `close`; Node 20's WebSocket does not.
    this.socket.onerror = () => { if (!this.opened) this.ended(1006); };
    this.socket.onclose = (ev) => this.ended(ev.code);
  }

  private ended(code: number): void {
    if (this.done) return;
    this.done = this.closed = true;
    this.unlisten();
    if (sockets.get(this.key) === this) sockets.delete(this.key);
    const why = code === WS_UNAUTHORIZED
      ? new HttpError(401, "the stream token was refused or expired (WebSocket 4001)")
      : !this.opened
        ? new HttpError(0, "the WebSocket did not open")
        : new Error(code === WS_SLOW_CONSUMER ? "fell behind" : `WebSocket closed (${code})`);
    for (const o of this.subs.values()) o.onClose(why);
    this.subs.clear();
  }

  private send(o: TransportOptions): void {
    this.socket.send(JSON.stringify({ op: "subscribe", id: o.id, ...(o.after === undefined ? {} : { after: o.after }) }));
  }

  add(o: TransportOptions): void {
    this.subs.set(o.id, o);
    if (this.opened) this.send(o);
  }

  remove(o: TransportOptions): void {
    if (this.subs.get(o.id) !== o) return;
    this.subs.delete(o.id);
    if (this.closed) return;
    if (this.subs.size === 0) this.close();
    else if (this.opened) this.socket.send(JSON.stringify({ op: "unsubscribe", id: o.id }));
  }

  private close(): void {
    this.closed = true;
    this.unlisten();
    if (sockets.get(this.key) === this) sockets.delete(this.key);
    this.socket.close(1000);
  }
}

const sockets = new Map<string, Shared>();

export function ws(o: TransportOptions): Transport {
  const key = `${o.baseUrl}\n${o.tokens.key}`;
  let shared = sockets.get(key);
  if (!shared || shared.closed) {
    shared = new Shared(key, o.baseUrl, o.tokens);
    sockets.set(key, shared);
  }
  const mine = shared;
  mine.add(o);
  return { close: () => mine.remove(o) };
}
