// The watch state machine: one transport at a time, resumed from the last seq seen after
// any drop (exponential backoff with jitter), duplicates dropped, the next transport
// tried when one is blocked, a re-check when a hidden tab becomes visible, and the token
// renewed through getToken before it expires and whenever the server refuses it.

import { fatalForStatus, PaystreamError } from "./codes.js";
import { type GetToken, tokensFor } from "./token.js";
import { headers, HttpError, url, type Transport, type TransportFactory, type TransportName } from "./transport.js";
import { poll } from "./transport_poll.js";
import { sse } from "./transport_sse.js";
import { ws } from "./transport_ws.js";
import { FINAL, type Transaction } from "./types.js";

const FACTORIES: Record<TransportName, TransportFactory> = { sse, ws, poll };

/** Failed connects in a row, on the last transport, before a watch that never received
 *  anything gives up with a "transport" error (about 8 s of backoff). */
const GIVE_UP_AFTER = 4;

/** A refresh refused with 429 (its transaction read moments ago, or a rate limit) is asked
 *  again at its Retry-After, at most this many times and only for a wait this short: the
 *  read after the customer's 3-D Secure approval must not be lost to the one at Pay. */
const REFRESH_RETRIES = 3;
const REFRESH_RETRY_MAX_MS = 10000;

/** Retry-After in milliseconds (seconds or an HTTP date), or undefined if it says neither. */
function retryAfterMs(value: string | null): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return seconds >= 0 ? seconds * 1000 : undefined;
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

/** Exactly one of `token` and `getToken`. */
export type Credentials =
  | {
    /** A stream token, sent as `Authorization: Bearer` (WebSocket: the first message). */
    token: string;
    getToken?: undefined;
  }
  | {
    /** Gives a fresh stream token: called at the start, before each token's `exp`, and
     *  when the server refuses one (HTTP 401, WebSocket close 4001). */
    getToken: GetToken;
    token?: undefined;
  };

export interface WatchBase {
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
  /** Ask the server to read the payment from Stripe now, once, at the start: for the page
   *  the customer lands on after confirming (or after a 3-D Secure redirect), so the
   *  outcome arrives before Stripe's webhook.  A refresh the server refuses with 429 is
   *  asked again at its Retry-After (up to 3 times, each wait at most 10 s). */
  refresh?: boolean;
  /** Ask for that read again after this many milliseconds without news. */
  refreshAfterMs?: number;
}

export type WatchOptions = WatchBase & Credentials;

export function watch(id: string, opts: WatchOptions): () => void {
  if ((typeof opts.token === "string") === (typeof opts.getToken === "function")) {
    throw new TypeError("watch() needs exactly one of `token` (a string) and `getToken` (a function)");
  }
  const tokens = tokensFor(opts.token, opts.getToken);
  const baseUrl = opts.baseUrl ?? globalThis.location?.origin ?? "";
  const order: TransportName[] = !opts.transport || opts.transport === "auto" ? ["sse", "ws", "poll"] : [opts.transport];
  const follow = opts.follow ?? false;
  let index = 0;
  let lastSeq = -1;
  let lastStatus: string | undefined;
  let attempt = 0;
  let live = false; // the current transport has delivered something
  let everLive = false; // some transport has
  let renewedFor401: string | undefined; // a token getToken gave after a refusal
  let connecting = false;
  let transport: Transport | null = null;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let quiet: ReturnType<typeof setTimeout> | undefined;
  let refreshRetry: ReturnType<typeof setTimeout> | undefined;
  let ended = false;

  // POST /refresh: the answer comes back through the stream like any change.  A 429 is
  // asked again at its Retry-After (bounded); a Stripe error changes nothing and is left
  // to the webhook, or the next quiet period.
  const refresh = async () => {
    for (let tries = 0; !ended; tries += 1) {
      let res: Response;
      try {
        const token = await tokens.fresh();
        res = await fetch(url(baseUrl, `/v1/transactions/${encodeURIComponent(id)}/refresh`, {}),
          { method: "POST", headers: headers(token), cache: "no-store" });
        void res.body?.cancel().catch(() => undefined); // the news comes through the stream
      } catch {
        return;
      }
      const wait = res.status === 429 ? retryAfterMs(res.headers.get("retry-after")) : undefined;
      if (wait === undefined || wait > REFRESH_RETRY_MAX_MS || tries >= REFRESH_RETRIES || ended) return;
      // One retry pending per watch: a later refresh's wait replaces (and drops) an earlier one's.
      await new Promise((resolve) => { clearTimeout(refreshRetry); refreshRetry = setTimeout(resolve, wait); });
    }
  };
  const rearm = () => {
    if (!opts.refreshAfterMs || ended) return;
    clearTimeout(quiet);
    quiet = setTimeout(() => { void refresh(); rearm(); }, opts.refreshAfterMs);
  };

  const end = () => {
    if (ended) return;
    ended = true;
    clearTimeout(timer);
    clearTimeout(quiet);
    clearTimeout(refreshRetry); // its refresh is never sent (the promise it awaited is dropped)
    transport?.close();
    transport = null;
    tokens.release();
    if (typeof document !== "undefined") document.removeEventListener("visibilitychange", onVisible);
  };

  const fail = (err: PaystreamError) => {
    if (ended) return;
    end();
    opts.onError?.(err);
  };

  const deliver = (tx: Transaction) => {
    if (ended || tx.seq <= lastSeq) return; // every update once, in seq order
    if (!live) opts.onTransport?.(order[index]);
    live = everLive = true;
    attempt = 0;
    lastSeq = tx.seq;
    lastStatus = tx.status;
    rearm();
    opts.onUpdate(tx);
    if (FINAL.has(tx.status) && !follow) end();
  };

  const open = () => {
    live = false;
    try {
      start();
    } catch (err) {
      // The transport could not even start (a bad baseUrl; ws:// refused on an https page).
      closed(new HttpError(0, String((err as Error)?.message ?? err)));
    }
  };

  const start = () => {
    const current: Transport = FACTORIES[order[index]]({
      baseUrl, tokens, id, follow,
      after: lastSeq >= 0 ? lastSeq : undefined,
      onEvent: deliver,
      onClose: (err) => {
        if (transport === current) transport = null;
        if (!ended) closed(err);
      },
    });
    transport = current;
  };

  // Connect with a token good for now (asking getToken first if the one held is due).
  const connect = () => {
    if (ended || connecting) return;
    connecting = true;
    tokens.fresh().then(
      () => { connecting = false; if (!ended) open(); },
      (err) => { connecting = false; fail(err); },
    );
  };

  const closed = (err: unknown) => {
    if (err instanceof HttpError && err.status === 401 && tokens.renewable && tokens.token !== renewedFor401) {
      // Refused (expired, or renewed too late): a new token, and resume at once from lastSeq.
      // A token given for this very reason and refused again ends the watch.
      connecting = true; // nothing else connects meanwhile (a tab becoming visible)
      tokens.renew().then(
        // Used as given, even if it looks expired by our clock (which may be wrong).
        (token) => { renewedFor401 = token; connecting = false; if (!ended) open(); },
        (e) => { connecting = false; fail(e); },
      );
      return;
    }
    if (err instanceof HttpError) {
      const fatal = fatalForStatus(err.status);
      if (fatal) return fail(fatal);
    }
    // Blocked (a proxy, an old browser, an origin not allowed): the next transport, at once.
    if (err && !live && index < order.length - 1 && (err instanceof HttpError || !everLive)) {
      index += 1;
      return connect();
    }
    if (!err && lastStatus && FINAL.has(lastStatus as never) && !follow) return end();
    if (err && !everLive && attempt >= GIVE_UP_AFTER) {
      return fail(new PaystreamError("transport", `could not connect to ${baseUrl}: ${(err as Error)?.message ?? err}`,
        undefined, err));
    }
    const delay = Math.min(15000, 500 * 2 ** attempt) * (0.5 + Math.random());
    attempt += 1;
    timer = setTimeout(connect, delay);
  };

  const onVisible = async () => {
    if (document.visibilityState !== "visible" || ended) return;
    // Timers are throttled in hidden tabs: read the state now, and reconnect at once.
    try {
      const token = await tokens.fresh();
      const res = await fetch(url(baseUrl, `/v1/transactions/${encodeURIComponent(id)}`, {}),
        { headers: headers(token), cache: "no-store" });
      if (res.ok) deliver(await res.json());
    } catch {
      /* the stream's own reconnect will catch up */
    }
    if (!transport && !ended) {
      clearTimeout(timer);
      connect();
    }
  };

  tokens.acquire();
  if (typeof document !== "undefined") document.addEventListener("visibilitychange", onVisible);
  connect();
  if (opts.refresh) void refresh();
  rearm();
  return end;
}
