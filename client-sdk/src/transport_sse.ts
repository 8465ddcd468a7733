// Server-Sent Events over fetch (works in browsers and Node; EventSource can neither send
// the token in a header, nor the cursor we keep, nor report HTTP statuses). The server
// ends the stream at its token's expiry; the next one uses the newest token.

import { headers, HttpError, url, type Transport, type TransportOptions } from "./transport.js";

export function sse(o: TransportOptions): Transport {
  const abort = new AbortController();
  const query = {
    last_event_id: o.after === undefined ? undefined : String(o.after),
    follow: o.follow ? "true" : undefined,
  };
  (async () => {
    const res = await fetch(url(o.baseUrl, `/v1/transactions/${encodeURIComponent(o.id)}/events`, query), {
      headers: headers(o.tokens.token, "text/event-stream"),
      signal: abort.signal,
      cache: "no-store",
    });
    if (!res.ok) throw new HttpError(res.status, `SSE answered ${res.status}`);
    if (!res.headers.get("content-type")?.startsWith("text/event-stream") || !res.body) {
      throw new HttpError(0, "not an event stream (a proxy in the way?)");
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let data = "";
        let event = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) data += line.slice(line[5] === " " ? 6 : 5);
          else if (line.startsWith("event:")) event = line.slice(line[6] === " " ? 7 : 6);
        }
        if ((event === "snapshot" || event === "status") && data) o.onEvent(JSON.parse(data));
      }
    }
  })().then(
    () => o.onClose(),
    (err) => { if (!abort.signal.aborted) o.onClose(err); },
  );
  return { close: () => abort.abort() };
}
