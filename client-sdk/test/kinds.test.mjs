// The SDK watches a subscription (sub_…) and a Checkout Session (cs_…) as it watches a
// payment, over each transport, against a live server and `paystream dev`'s local Stripe
// (paystream.dev.emulator): a subscription's stream stays open through active and ends
// at canceled; a session's ends when it is paid (issue 23 section 6).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { FINAL, waitFor, watch } from "../dist/index.js";
import { eventually, Paystream, startLocalStripe } from "./helpers.mjs";

const VISA = "4242424242424242";
const METRIC = { sse: "sse", ws: "ws", poll: "long_poll" };
let ps, stripe, price;

before(async () => {
  stripe = await startLocalStripe();
  ps = await (await Paystream.create({ STRIPE_API_BASE: stripe.url })).start();
  await stripe.registerWebhook(`${ps.url}/v1/stripe/webhook`, ps.secrets.STRIPE_WEBHOOK_SECRET);
  const made = await stripe.api("/v1/prices", {
    currency: "usd", unit_amount: "2900", "recurring[interval]": "month", "product_data[name]": "Monthly" });
  assert.equal(made.status, 200, JSON.stringify(made.body));
  price = made.body.id;
});
after(async () => {
  await ps?.stop();
  stripe?.stop();
});

/** Stripe.js's confirmCardPayment(clientSecret) with a test card, at the local Stripe. */
async function confirmCard(clientSecret, number = VISA) {
  const pm = await stripe.api("/v1/payment_methods", {
    type: "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2030", "card[cvc]": "123" });
  const pi = clientSecret.split("_secret_")[0];
  assert.equal((await stripe.api(`/v1/payment_intents/${pi}`, { payment_method: pm.body.id })).status, 200);
  const confirmed = await stripe.api(`/v1/payment_intents/${pi}/confirm`, {});
  assert.equal(confirmed.status, 200, JSON.stringify(confirmed.body));
}

function collect(t, id, options) {
  const updates = [];
  const errors = [];
  const stop = watch(id, { baseUrl: ps.url, ...options, onUpdate: (tx) => updates.push(tx), onError: (e) => errors.push(e) });
  t.after(stop); // a failed test leaves no stream open for the next one's count
  const reached = (status) => eventually(async () => updates.some((u) => u.status === status), `${id} ${status}`);
  return { updates, errors, stop, reached };
}

test("FINAL holds each kind's ends, and not a subscription's active", () => {
  for (const status of ["succeeded", "canceled", "refunded", "incomplete_expired"]) assert.ok(FINAL.has(status), status);
  for (const status of ["active", "past_due", "trialing", "incomplete", "processing"]) assert.ok(!FINAL.has(status), status);
});

for (const transport of ["sse", "ws", "poll"]) {
  describe(`transport ${transport}`, () => {
    test("a subscription: incomplete, active after its first payment (the stream stays open), canceled ends it", async (t) => {
      const customer = (await stripe.api("/v1/customers", { email: "sub@example.com" })).body.id;
      const created = await ps.backend("POST", "/v1/transactions", { kind: "subscription", customer_id: customer, price });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      const { transaction, client_secret: secret, stream_token: token } = created.body;
      assert.equal(transaction.status, "incomplete");
      const sub = transaction.stripe_id;
      const w = collect(t, sub, { token, transport });
      // (Another token: over WebSocket, watches sharing a credential share a socket, where an
      // id is subscribed once.)
      const subscribed = waitFor(sub, { baseUrl: ps.url, token: ps.token(sub), transport, timeoutMs: 20000 }); // default: active
      await w.reached("incomplete");
      await confirmCard(secret);
      const active = await subscribed;
      assert.equal(active.kind, "subscription");
      assert.equal(active.status, "active");
      assert.ok(active.current_period_end && active.cancel_at_period_end === false && "trial_end" in active, JSON.stringify(active));
      await w.reached("active");

      // A change that keeps the status reaches every transport (the long-poll asks for any
      // change after its newest seq): the cancel at period end, still active.
      const atEnd = await ps.backend("POST", `/v1/transactions/${transaction.id}/cancel`, { at_period_end: true });
      assert.equal(atEnd.status, 200, JSON.stringify(atEnd.body));
      await eventually(async () => w.updates.some((u) => u.status === "active" && u.cancel_at_period_end === true),
        `${sub} cancel_at_period_end over ${transport}`);

      // Active is not an end: the same watch hears the cancel, and only then ends.
      const canceled = await ps.backend("POST", `/v1/transactions/${transaction.id}/cancel`, {});
      assert.equal(canceled.status, 200, JSON.stringify(canceled.body));
      await w.reached("canceled");
      await eventually(async () => (await ps.connections(METRIC[transport])) === 0, "the stream to end at canceled");
      assert.deepEqual(w.errors, []);
      const seqs = w.updates.map((u) => u.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "in seq order, once each");
      assert.equal(new Set(seqs).size, seqs.length);
      w.stop();
    });

    test("a Checkout Session watched by its cs_ id with a token for it alone: paid on the hosted page, the stream ends", async (t) => {
      const created = await ps.backend("POST", "/v1/transactions", {
        kind: "checkout", mode: "payment", amount: 4200, currency: "usd",
        success_url: "https://shop.example/return?session_id={CHECKOUT_SESSION_ID}", cancel_url: "https://shop.example/cart" });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      const session = created.body.transaction.stripe_id;
      assert.match(session, /^cs_/);
      const token = ps.token(session); // what the return page's backend mints
      const w = collect(t, session, { token, transport, refresh: true });
      await w.reached("requires_payment_method");
      assert.deepEqual([w.updates[0].kind, w.updates[0].session_status, w.updates[0].payment_status],
        ["checkout", "open", "unpaid"]);
      const paid = waitFor(session, { baseUrl: ps.url, token: ps.token(session, created.body.transaction.id), transport,
        timeoutMs: 20000 });
      const done = await stripe.api(`/v1/checkout/sessions/${session}/_complete`, { card: VISA });
      assert.equal(done.status, 200, JSON.stringify(done.body));
      const tx = await paid;
      assert.deepEqual([tx.status, tx.session_status, tx.payment_status], ["succeeded", "complete", "paid"]);
      await w.reached("succeeded");
      await eventually(async () => (await ps.connections(METRIC[transport])) === 0, "the stream to end at succeeded");
      assert.deepEqual(w.errors, []);
      w.stop();
    });
  });
}
