// @paystream/client: push payment status to the browser.

import { PaystreamError } from "./codes.js";
import { type Credentials, watch, type WatchBase } from "./stream.js";
import type { Status, Transaction } from "./types.js";

export { PaystreamError, type ErrorCode } from "./codes.js";
export { type Credentials, watch, type WatchBase, type WatchOptions } from "./stream.js";
export type { GetToken } from "./token.js";
export type { TransportName } from "./transport.js";
export { FINAL, type Status, type Transaction } from "./types.js";

export type WaitOptions = Omit<WatchBase, "onUpdate" | "onError"> & Credentials & {
  /** Resolve on these statuses (default: ["succeeded"]). */
  until?: Status[];
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Every update on the way, as watch() gives it. */
  onUpdate?(tx: Transaction): void;
};

const AFTER_SUCCESS: Status[] = ["partially_refunded", "refunded", "disputed"];

/** Wait for a transaction to reach one of `until`; rejects with a PaystreamError for a
 *  decline pushed while waiting (code "declined", with last_error), a cancel, a timeout,
 *  a refused token, no transport connecting, or an abort (and with a TypeError unless
 *  exactly one of `token` and `getToken` is given). */
export function waitFor(id: string, options: WaitOptions): Promise<Transaction> {
  const until = options.until ?? ["succeeded"];
  return new Promise((resolve, reject) => {
    if (options.signal?.aborted) return reject(new PaystreamError("aborted", "waitFor was aborted"));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const settle = (fn: () => void) => {
      stop();
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
      fn();
    };
    const onAbort = () => settle(() => reject(new PaystreamError("aborted", "waitFor was aborted")));
    const stop = watch(id, {
      ...options,
      onUpdate(tx) {
        options.onUpdate?.(tx);
        if (until.includes(tx.status) || (until.includes("succeeded") && AFTER_SUCCESS.includes(tx.status))) {
          settle(() => resolve(tx));
        } else if (tx.status === "canceled") {
          settle(() => reject(new PaystreamError("canceled", "the transaction was canceled", tx)));
        } else if (tx.status === "requires_payment_method" && tx.last_error && tx.cause) {
          // Only a decline pushed while we wait: a snapshot may show an earlier attempt's.
          const message = String(tx.last_error.message ?? tx.last_error.code ?? "declined");
          settle(() => reject(new PaystreamError("declined", message, tx)));
        }
      },
      onError: (err) => settle(() => reject(err)),
    });
    if (options.timeoutMs !== undefined) {
      timer = setTimeout(() => settle(() => reject(new PaystreamError("timeout", `no answer in ${options.timeoutMs} ms`))),
        options.timeoutMs);
    }
    options.signal?.addEventListener("abort", onAbort);
  });
}
