// A React 19 page for test/react.test.mjs: one <Payment> whose id the test sets (or
// unmounts) through window.show(), listing each status it shows, in order.
import { useEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import { usePaymentStatus } from "@paystream/client/react";

// Every request the SDK opens, each abort of one, and each response body the server
// ended (an SSE stream ends at its token's expiry), in order.
window.requests = [];
const realFetch = window.fetch;
window.fetch = async (input, init = {}) => {
  const url = new URL(String(input instanceof Request ? input.url : input), location.href);
  const name = url.pathname;
  window.requests.push(["open", name, url.search]);
  init.signal?.addEventListener("abort", () => window.requests.push(["abort", name]));
  const res = await realFetch(input, init);
  if (!res.body) return res;
  const ended = new TransformStream({ flush: () => { window.requests.push(["end", name]); } });
  return new Response(res.body.pipeThrough(ended), { status: res.status, statusText: res.statusText, headers: res.headers });
};
window.updates = []; // every onUpdate: [id, seq, status]

function Payment({ id, renew, transport }) {
  const { transaction, status, error } = usePaymentStatus(id, {
    transport,
    // The test mints the tokens (exposed by playwright): short-lived ones with `renew`.
    ...(renew ? { getToken: () => window.mintToken(id, 2) } : { token: window.tokens[id] }),
    onUpdate: (tx) => window.updates.push([id, tx.seq, tx.status]),
  });
  const [shown, setShown] = useState([]);
  useEffect(() => {
    if (status) setShown((s) => [...s, [id, status]]);
  }, [id, status]);
  return (
    <section>
      <h1>Payment {id}</h1>
      <ol id="statuses">
        {shown.map(([i, s], n) => <li key={n} data-id={i} data-status={s}>{i}: {s}</li>)}
      </ol>
      <p id="current" data-seq={transaction?.seq ?? ""}>{status ?? "waiting"}</p>
      {error && <p id="error">{error.code}</p>}
    </section>
  );
}

function App() {
  const [props, setProps] = useState(null);
  window.show = setProps;
  return props ? <Payment {...props} /> : <p id="none">no payment shown</p>;
}

window.tokens = {};
createRoot(document.getElementById("root")).render(<App />);
