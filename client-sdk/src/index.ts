// @paystream/client: push payment status to the browser.

import { PaystreamError } from "./codes.js";
import { type Credentials, watch, type WatchBase } from "./stream.js";
import { FINAL, type Status, type Transaction } from "./types.js";

export { PaystreamError, type ErrorCode } from "./codes.js";
export { type Credentials, watch, type WatchBase, type WatchOptions } from "./stream.js";
export type { GetToken } from "./token.js";
export type { TransportName } from "./transport.js";
export {
  type CheckoutTransaction, FINAL, type InvoiceTransaction, type Kind, type PaymentIntentStatus, type PaymentTransaction,
  type Refund, type Status, STATUSES, type SubscriptionStatus, type SubscriptionTransaction, type Transaction,
} from "./types.js";

export type WaitOptions = Omit<WatchBase, "onUpdate" | "onError"> & Credentials & {
  /** Resolve on these statuses. Default: `succeeded` (or a later refund or dispute);
   *  for a subscription, `active` or `trialing`. */
  until?: Status[];
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Every update on the way, as watch() gives it. */
  onUpdate?(tx: Transaction): void;
};

const AFTER_SUCCESS: Status[] = ["partially_refunded", "refunded", "disputed"];

const SUBSCRIBED: Status[] = ["active", "trialing"];

/** Wait for a transaction to reach one of `until`; rejects with a PaystreamError for a
 *  decline pushed while waiting (code "declined", with last_error), a cancel (a
 *  subscription's `canceled` or `incomplete_expired` too), another final status ("ended"),
 *  a timeout, a refused token, no transport connecting, or an abort (and with a TypeError
 *  unless exactly one of `token` and `getToken` is given). */
export function waitFor(id: string, options: WaitOptions): Promise<Transaction> {
  const until = (tx: Transaction): Status[] =>
    options.until ?? (tx.kind === "subscription" ? SUBSCRIBED : ["succeeded"]);
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
        const wanted = until(tx);
        if (wanted.includes(tx.status) || (wanted.includes("succeeded") && AFTER_SUCCESS.includes(tx.status))) {
          settle(() => resolve(tx));
        } else if (tx.status === "canceled" || tx.status === "incomplete_expired") {
          const what = tx.status === "canceled" ? "was canceled" : "expired before its first payment";
          settle(() => reject(new PaystreamError("canceled", `the transaction ${what}`, tx)));
        } else if (tx.status === "requires_payment_method" && tx.last_error && tx.cause) {
          // Only a decline pushed while we wait: a snapshot may show an earlier attempt's.
          // (A subscription's declined first payment leaves it `incomplete`, with no error:
          // the page hears of it from Stripe.js's confirm.)
          const message = String(tx.last_error.message ?? tx.last_error.code ?? "declined");
          settle(() => reject(new PaystreamError("declined", message, tx)));
        } else if (FINAL.has(tx.status) && !options.follow) {
          // The stream ends here: nothing `until` names can come any more.
          settle(() => reject(new PaystreamError("ended", `the transaction ended ${tx.status}`, tx)));
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
