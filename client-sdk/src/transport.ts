// One interface every transport implements; stream.ts drives whichever is chosen.

import type { Tokens } from "./token.js";
import type { Transaction } from "./types.js";

export interface TransportOptions {
  baseUrl: string;
  /** `tokens.token` is the newest token (never put in a URL); over WebSocket, renewals are sent on the socket. */
  tokens: Tokens;
  id: string;
  /** Resume after this seq (every later event is replayed); undefined: start with a snapshot. */
  after?: number;
  /** Keep the stream after a final status (refunds, disputes). */
  follow: boolean;
  onEvent(tx: Transaction): void;
  /** The transport ended: `error` unset when the server closed it normally. */
  onClose(error?: unknown): void;
}

export interface Transport {
  close(): void;
}

export type TransportName = "sse" | "ws" | "poll";
export type TransportFactory = (options: TransportOptions) => Transport;

export function url(base: string, path: string, query: Record<string, string | undefined>): string {
  const u = new URL(path, base);
  for (const [k, v] of Object.entries(query)) if (v !== undefined) u.searchParams.set(k, v);
  return u.toString();
}

export function headers(token: string, accept = "application/json"): Record<string, string> {
  return { Accept: accept, Authorization: `Bearer ${token}` };
}

/** An HTTP answer the transport could not use; `status` 0 for a network failure. */
export class HttpError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}
