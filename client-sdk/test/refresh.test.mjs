// watch({ refresh: true }) and refreshAfterMs (issue 12): the page a customer lands on after
// confirming reads the outcome from Stripe through paystream, not waiting for the webhook.
// Here the local Stripe has no webhook endpoint at all, so only a refresh can bring the news.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { watch } from "../dist/index.js";
import { Paystream, startLocalStripe } from "./helpers.mjs";

let stripe, ps;

before(async () => {
  stripe = await startLocalStripe(); // no webhook registered: Stripe's events never arrive
  ps = await (await Paystream.create({ STRIPE_API_BASE: stripe.url })).start();
});
after(async () => {
  await ps?.stop();
  stripe?.stop();
});

async function paidPayment() {
  const created = await fetch(`${ps.url}/v1/transactions`, {
    method: "POST",
    headers: { Authorization: `Bearer ${ps.secrets.PAYSTREAM_API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ kind: "payment", amount: 1500, currency: "usd" }),
  }).then((r) => r.json());
  const { id, stripe_id: pi } = created.transaction;
  const auth = { Authorization: "Bearer sk_test_x" };
  const pm = await fetch(`${stripe.url}/v1/payment_methods`, { method: "POST", headers: auth,
    body: new URLSearchParams({ type: "card", "card[number]": "4242424242424242", "card[exp_month]": "12",
      "card[exp_year]": "2030", "card[cvc]": "123" }) }).then((r) => r.json());
  await fetch(`${stripe.url}/v1/payment_intents/${pi}`, { method: "POST", headers: auth,
    body: new URLSearchParams({ payment_method: pm.id }) });
  return { id, pi, token: created.stream_token, confirm: () => fetch(`${stripe.url}/v1/payment_intents/${pi}/confirm`,
    { method: "POST", headers: auth }) };
}

function statuses(id, options) {
  const seen = [];
  let done;
  const finished = new Promise((resolve, reject) => {
    done = watch(id, { baseUrl: ps.url, ...options, transport: "sse",
      onUpdate: (tx) => { seen.push([tx.status, tx.cause?.type ?? "snapshot"]); if (tx.status === "succeeded") resolve(); },
      onError: reject });
  });
  return { seen, finished, stop: () => done() };
}

test("refresh: true reads the outcome at once on the page after confirm", async () => {
  const payment = await paidPayment();
  assert.equal((await payment.confirm()).status, 200);
  const w = statuses(payment.id, { token: payment.token, refresh: true });
  await w.finished;
  w.stop();
  // No webhook can arrive here: succeeded came from the refresh, pushed (or, if the refresh
  // won the race with the stream's first read, already in the snapshot).
  assert.equal(w.seen.at(-1)[0], "succeeded");
  assert.ok(["paystream.refresh", "snapshot"].includes(w.seen.at(-1)[1]), String(w.seen));
});

test("refreshAfterMs reads it again after that long without news", async () => {
  const payment = await paidPayment();
  const w = statuses(payment.id, { token: payment.token, refresh: true, refreshAfterMs: 2500 });
  // The first refresh finds nothing new; the payment is confirmed meanwhile; the quiet
  // period's refresh brings it.
  assert.equal((await payment.confirm()).status, 200);
  await w.finished;
  w.stop();
  assert.deepEqual(w.seen.at(-1), ["succeeded", "paystream.refresh"]);
});

test("a refused refresh is retried at its Retry-After, so the outcome still comes from it", { timeout: 20000 }, async () => {
  // Issue 22: a refresh refused 429 (this transaction was read moments ago) was dropped, and
  // the page waited for the webhook. Here no webhook can come: only the retry brings it.
  const payment = await paidPayment();
  const refresh = () => fetch(`${ps.url}/v1/transactions/${payment.id}/refresh`,
    { method: "POST", headers: { Authorization: `Bearer ${payment.token}` } });
  for (let i = 0; i < 2; i += 1) assert.equal((await refresh()).status, 200); // two in a row: the burst
  assert.equal((await payment.confirm()).status, 200);
  const sent = []; // each refresh the SDK sends, as [sent at, its answer]
  const realFetch = globalThis.fetch;
  globalThis.fetch = (input, init) => {
    const res = realFetch(input, init);
    if (String(input).endsWith("/refresh")) sent.push([Date.now(), res]);
    return res;
  };
  try {
    const w = statuses(payment.id, { token: payment.token, refresh: true });
    await w.finished;
    w.stop();
    assert.deepEqual(w.seen.at(-1), ["succeeded", "paystream.refresh"]);
  } finally {
    globalThis.fetch = realFetch;
  }
  // The pushed outcome may arrive before the refresh's own answer: wait for the answers.
  const answers = await Promise.all(sent.map(([at, res]) => res.then((r) => [r.status, r.headers.get("retry-after"), at])));
  assert.deepEqual(answers.map(([status]) => status), [429, 200], JSON.stringify(answers));
  const waited = answers[1][2] - answers[0][2];
  assert.ok(waited >= Number(answers[0][1]) * 1000 - 50, `retried ${waited} ms after a Retry-After of ${answers[0][1]} s`);
});
