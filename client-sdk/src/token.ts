// Stream tokens: a fixed `token`, or `getToken()` called again before each token expires
// (read from the JWT's `exp`, not verified: the server does that) and whenever the server
// refuses one. Watches given the same getToken function share one Tokens, so they share
// its renewals and (over WebSocket) one socket.

import { PaystreamError } from "./codes.js";

export type GetToken = () => string | Promise<string>;

/** The `exp` claim of a JWT, in ms since the epoch; undefined when there is none to read. */
export function expiry(token: string): number | undefined {
  try {
    const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return typeof claims.exp === "number" ? claims.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/** How long before `exp` to renew: 10% of the lifetime, at most 30 s, at least 1 s. */
export function renewalDelay(lifetimeMs: number): number {
  const lead = Math.max(1000, Math.min(30000, lifetimeMs / 10));
  // A token that lives under ~2 s cannot be renewed 1 s ahead: renew half-way instead.
  return Math.min(Math.max(lifetimeMs - lead, lifetimeMs / 2), 2 ** 31 - 1);
}

let keys = 0;
const byFunction = new WeakMap<GetToken, Tokens>();

export class Tokens {
  /** The newest token; "" until getToken first answered. */
  token: string;
  /** Names the credential for sharing a WebSocket: the fixed token, or the getToken function. */
  readonly key: string;
  private pending?: Promise<string>;
  private timer?: ReturnType<typeof setTimeout>;
  private users = 0;
  private readonly listeners = new Set<(token: string) => void>();

  constructor(private readonly getToken?: GetToken, token = "") {
    this.token = token;
    this.key = getToken ? `f${++keys}` : `t${token}`;
  }

  get renewable(): boolean {
    return !!this.getToken;
  }

  /** A token to connect with: the current one, unless it is missing or due for renewal. */
  fresh(): Promise<string> {
    const exp = this.token ? expiry(this.token) : undefined;
    const due = this.getToken && (!this.token || (exp !== undefined && exp - Date.now() < 1000));
    return due ? this.renew() : Promise.resolve(this.token);
  }

  /** Call getToken now (one call at a time, whoever asks). */
  renew(): Promise<string> {
    const getToken = this.getToken;
    if (!getToken) return Promise.reject(new PaystreamError("unauthorized", "the stream token was refused"));
    if (!this.pending) {
      const pending = (async () => {
        let token: unknown;
        try {
          token = await getToken();
        } catch (err) {
          throw new PaystreamError("unauthorized", `getToken failed: ${(err as Error)?.message ?? err}`, undefined, err);
        }
        if (typeof token !== "string" || !token) throw new PaystreamError("unauthorized", "getToken gave no token");
        this.token = token;
        this.schedule();
        for (const listener of this.listeners) listener(token);
        return token;
      })();
      this.pending = pending;
      const clear = () => { if (this.pending === pending) this.pending = undefined; };
      pending.then(clear, clear);
    }
    return this.pending;
  }

  /** Told each renewed token (the WebSocket sends it on its open socket). */
  onRenew(listener: (token: string) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** A watch starts using these tokens: renew ahead of expiry while anyone does. */
  acquire(): void {
    if (++this.users === 1) this.schedule();
  }

  release(): void {
    if (--this.users === 0) clearTimeout(this.timer);
  }

  private schedule(retry = false): void {
    clearTimeout(this.timer);
    const exp = this.token ? expiry(this.token) : undefined;
    if (!this.getToken || !this.users || exp === undefined) return;
    const left = exp - Date.now();
    // Already expired by our clock (or a skewed one): renewing again at once would loop;
    // the server's refusal (401, close 4001) asks for the next one.
    if (left <= 0 || (retry && left < 2000)) return;
    const delay = retry ? left / 2 : renewalDelay(left);
    this.timer = setTimeout(() => {
      // A failed renewal is tried again half-way to exp; if all fail, the server's
      // refusal of the old token brings the watch's own renewal (and its error).
      this.renew().catch(() => this.schedule(true));
    }, delay);
  }
}

/** The Tokens for a watch's options: shared per getToken function, one per fixed token. */
export function tokensFor(token: string | undefined, getToken: GetToken | undefined): Tokens {
  if (!getToken) return new Tokens(undefined, token);
  let tokens = byFunction.get(getToken);
  if (!tokens) byFunction.set(getToken, (tokens = new Tokens(getToken)));
  return tokens;
}
