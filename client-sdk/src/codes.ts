// Every error the SDK raises, in one place. `code` is stable; branch on it.

import type { Transaction } from "./types.js";

export type ErrorCode =
  | "declined"      // a payment attempt failed: see transaction.last_error (the customer may retry)
  | "canceled"      // the transaction was canceled (a subscription: canceled, or incomplete_expired)
  | "ended"         // waitFor: it reached another final status than `until` names (its stream ended)
  | "timeout"       // waitFor's timeoutMs passed first
  | "unauthorized"  // the stream token is missing, forged or expired (HTTP 401, WebSocket 4001), and
                    // getToken (if given) could not replace it: it threw, or its new token was refused too
  | "forbidden"     // the token does not cover this transaction (HTTP 403)
  | "not_found"     // no such transaction (HTTP 404)
  | "aborted"       // the AbortSignal fired
  | "transport";    // no transport ever connected (network, proxy, an origin the server does not allow)

export class PaystreamError extends Error {
  readonly code: ErrorCode;
  readonly transaction?: Transaction;
  constructor(code: ErrorCode, message: string, transaction?: Transaction, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "PaystreamError";
    this.code = code;
    this.transaction = transaction;
  }
}

/** HTTP statuses that retrying cannot fix. */
export function fatalForStatus(status: number): PaystreamError | null {
  if (status === 401) return new PaystreamError("unauthorized", "the stream token was refused");
  if (status === 403) return new PaystreamError("forbidden", "the stream token does not cover this transaction");
  if (status === 404) return new PaystreamError("not_found", "no such transaction");
  return null;
}

/** WebSocket close codes: a refused or expired token; a reader that fell too far behind. */
export const WS_UNAUTHORIZED = 4001;
export const WS_SLOW_CONSUMER = 4008;
