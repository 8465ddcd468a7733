// Long-poll fallback: asks the server to answer on any change after the newest seq it has
// (`after`: a status, or a change that keeps it, such as a subscription's
// cancel_at_period_end), or when the status leaves the current one. Every answer is checked
// against seq, so nothing is delivered twice. Each request carries the newest token.

import { headers, HttpError, url, type Transport, type TransportOptions } from "./transport.js";
import { FINAL, STATUSES, type Status, type Transaction } from "./types.js";

export function poll(o: TransportOptions): Transport {
  const abort = new AbortController();
  (async () => {
    let current: Status | undefined;
    let seq: number | undefined;
    for (;;) {
      // Any status but the current one, of any kind (a subscription's run both ways).
      const waitFor = STATUSES.filter((s) => s !== current).join(",");
      const query = { await: waitFor, after: seq === undefined ? undefined : String(seq), timeout: "25" };
      const res = await fetch(url(o.baseUrl, `/v1/transactions/${encodeURIComponent(o.id)}`, query),
        { headers: headers(o.tokens.token), signal: abort.signal, cache: "no-store" });
      if (!res.ok) throw new HttpError(res.status, `long-poll answered ${res.status}`);
      const tx = (await res.json()) as Transaction & { timed_out?: boolean };
      delete tx.timed_out;
      o.onEvent(tx);
      current = tx.status;
      seq = tx.seq;
      // The long-poll answers at once for a final status, so it cannot follow past one.
      if (FINAL.has(tx.status)) return;
    }
  })().then(
    () => o.onClose(),
    (err) => { if (!abort.signal.aborted) o.onClose(err); },
  );
  return { close: () => abort.abort() };
}
