// @paystream/client/react: usePaymentStatus(), a React hook over watch(). React is an
// optional peer dependency; this entry is built apart, so the core bundle never holds it.

import { useEffect, useRef, useState } from "react";

import { type PaystreamError, type Status, type Transaction, watch, type WatchBase } from "./index.js";
import type { GetToken } from "./token.js";

/** watch()'s options, with every callback optional. Without an `id`, or while `token` is
 *  null or undefined, nothing is opened (handy while either is still loading). */
export type PaymentStatusOptions = Omit<WatchBase, "onUpdate"> & { onUpdate?(tx: Transaction): void } & (
  | { token?: string | null; getToken?: undefined }
  | { getToken: GetToken; token?: undefined }
);

export interface PaymentStatus {
  /** The newest state, once the first one arrived. */
  transaction: Transaction | undefined;
  /** Its status: a payment's or session's (`succeeded`, …) or a subscription's (`active`, `past_due`, …). */
  status: Status | undefined;
  /** Why the stream ended (unauthorized, forbidden, not_found, transport); it does not retry after one. */
  error: PaystreamError | undefined;
}

interface State {
  id?: string;
  transaction?: Transaction;
  error?: PaystreamError;
}

/** Follow one transaction's status, pushed: a payment's (`pi_…`), a Checkout Session's
 *  (`cs_…`), a subscription's (`sub_…`, whose stream stays open through `active` and
 *  `past_due` and ends at `canceled` or `incomplete_expired`), any kind's; narrow
 *  `transaction` on `kind` for its own fields. The stream opens on mount, closes on unmount,
 *  and a new `id` closes the old stream before the new one opens. Changing `baseUrl`,
 *  `transport`, `follow` or `token` reopens it (starting with a snapshot); `getToken`
 *  and the callbacks are read at each use, so new functions each render are fine.
 *  Updates that land in one render show only the newest; `onUpdate` sees every one. */
export function usePaymentStatus(id: string | null | undefined, options: PaymentStatusOptions): PaymentStatus {
  const [state, setState] = useState<State>({});
  const latest = useRef(options);
  useEffect(() => {
    latest.current = options;
  });
  const { baseUrl, transport, follow, token } = options;
  const renewable = typeof options.getToken === "function";

  useEffect(() => {
    if (!id || (!renewable && !token)) return;
    return watch(id, {
      baseUrl, transport, follow,
      ...(renewable ? { getToken: () => (latest.current.getToken as GetToken)() } : { token: token as string }),
      onUpdate(transaction) {
        setState({ id, transaction });
        latest.current.onUpdate?.(transaction);
      },
      onError(error) {
        setState((s) => ({ id, transaction: s.id === id ? s.transaction : undefined, error }));
        latest.current.onError?.(error);
      },
      onTransport: (name) => latest.current.onTransport?.(name),
    });
  }, [id, baseUrl, transport, follow, token, renewable]);

  const mine = state.id === id ? state : {};
  return { transaction: mine.transaction, status: mine.transaction?.status, error: mine.error };
}
