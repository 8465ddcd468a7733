// The watch state machine: one transport at a time, resumed from the last seq seen after
// any drop (exponential backoff with jitter), duplicates dropped, the next transport
// tried when one is blocked, and a re-check when a hidden tab becomes visible.

import { fatalForStatus, PaystreamError } from "./codes.js";
import { HttpError, url, type Transport, type TransportFactory, type TransportName } from "./transport.js";
import { poll } from "./transport_poll.js";
import { sse } from "./transport_sse.js";
import { ws } from "./transport_ws.js";
import { FINAL, type Transaction } from "./types.js";

const FACTORIES: Record<TransportName, TransportFactory> = { sse, ws, poll };

export interface WatchOptions {
  token: string;
  /** The paystream server; defaults to the page's origin. */
  baseUrl?: string;
  /** "auto" (default) tries SSE, then WebSocket, then long-poll. */
  transport?: "auto" | TransportName;
  /** Keep watching after a final status (refunds, disputes). */
  follow?: boolean;
  onUpdate(tx: Transaction): void;
  onError?(err: PaystreamError): void;
  /** Called with the transport in use each time one connects (for diagnostics). */
  onTransport?(name: TransportName): void;
}

export function watch(id: string, opts: WatchOptions): () => void {
  const baseUrl = opts.baseUrl ?? globalThis.location?.origin ?? "";
  const order: TransportName[] = !opts.transport || opts.transport === "auto" ? ["sse", "ws", "poll"] : [opts.transport];
  const follow = opts.follow ?? false;
  let index = 0;
  let lastSeq = -1;
  let lastStatus: string | undefined;
  let attempt = 0;
  let live = false; // the current transport has delivered something
  let transport: Transport | null = null;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let ended = false;

  const end = () => {
    ended = true;
    clearTimeout(timer);
    transport?.close();
    transport = null;
    if (typeof document !== "undefined") document.removeEventListener("visibilitychange", onVisible);
  };

  const deliver = (tx: Transaction) => {
    if (ended || tx.seq <= lastSeq) return; // every update once, in seq order
    if (!live) opts.onTransport?.(order[index]);
    live = true;
    attempt = 0;
    lastSeq = tx.seq;
    lastStatus = tx.status;
    opts.onUpdate(tx);
    if (FINAL.has(tx.status) && !follow) end();
  };

  const connect = () => {
    if (ended) return;
    live = false;
    const current: Transport = FACTORIES[order[index]]({
      baseUrl, token: opts.token, id, follow,
      after: lastSeq >= 0 ? lastSeq : undefined,
      onEvent: deliver,
      onClose: (err) => {
        if (transport === current) transport = null;
        if (!ended) closed(err);
      },
    });
    transport = current;
  };

  const closed = (err: unknown) => {
    if (err instanceof HttpError) {
      const fatal = fatalForStatus(err.status);
      if (fatal) {
        end();
        opts.onError?.(fatal);
        return;
      }
      if (!live && index < order.length - 1) {
        index += 1; // blocked (a proxy, an old browser): the next transport, at once
        connect();
        return;
      }
    }
    if (!err && lastStatus && FINAL.has(lastStatus as never) && !follow) return end();
    const delay = Math.min(15000, 500 * 2 ** attempt) * (0.5 + Math.random());
    attempt += 1;
    timer = setTimeout(connect, delay);
  };

  const onVisible = async () => {
    if (document.visibilityState !== "visible" || ended) return;
    // Timers are throttled in hidden tabs: read the state now, and reconnect at once.
    try {
      const res = await fetch(url(baseUrl, `/v1/transactions/${encodeURIComponent(id)}`, { token: opts.token }),
        { cache: "no-store" });
      if (res.ok) deliver(await res.json());
    } catch {
      /* the stream's own reconnect will catch up */
    }
    if (!transport && !ended) {
      clearTimeout(timer);
      connect();
    }
  };

  if (typeof document !== "undefined") document.addEventListener("visibilitychange", onVisible);
  connect();
  return end;
}
