// The demo's other flows (issue 23 section 6) in real headless Chromium and Firefox: the
// Studio plan paid through a subscription, its first payment confirmed on the page with
// 3-D Secure; and Stripe's hosted Checkout page, after which /demo/return follows the
// session live. Against `paystream dev`'s own local Stripe (paystream.dev.emulator).

import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { BROWSERS, skipReason } from "./browsers.mjs";
import { ARTIFACTS, eventually, Paystream, startLocalStripe } from "./helpers.mjs";

const polled = (requests) => requests.filter((u) => /\/v1\/transactions\/[^/?]+(\?|$)/.test(u));
const rows = (page) => page.evalAll("#timeline li", (lis) => lis.map((li) => ({
  status: li.dataset.status, via: li.querySelector(".via")?.textContent ?? "",
})));

for (const browserInfo of BROWSERS) {
  const { name, path, launch } = browserInfo;
  const skip = skipReason(browserInfo);
  describe(name, { skip }, () => {
    let browser, stripe, ps;

    before(async () => {
      if (skip) return;
      browser = await launch(path);
      ps = await Paystream.create();
      // As `paystream dev` starts it: its sessions' hosted page is the demo's stand-in.
      stripe = await startLocalStripe({ checkoutPage: `${ps.url}/demo/hosted/` });
      ps.env = { STRIPE_API_BASE: stripe.url };
      await ps.start();
      await stripe.registerWebhook(`${ps.url}/v1/stripe/webhook`, ps.secrets.STRIPE_WEBHOOK_SECRET);
    });
    after(async () => {
      await browser?.close();
      await ps?.stop();
      stripe?.stop();
    });

    async function open(path) {
      const page = await browser.newPage();
      const requests = [];
      page.onRequest((u) => requests.push(u));
      await page.goto(`${ps.url}${path}`);
      return { page, requests };
    }

    test("the Studio plan: 3-D Secure on the first payment, then active, and the stream stays open until canceled", async () => {
      const { page, requests } = await open("/demo");
      await page.check("input[name=product][value=plan]");
      assert.match(await page.text("#pay"), /Subscribe/);
      await page.check('input[value="3ds"]');
      await page.click("#pay");
      // The subscription starts incomplete; confirm's answer asks for the bank's challenge.
      await page.waitForSelector("li[data-status=incomplete]");
      await page.waitForFunction(() => getComputedStyle(document.getElementById("challenge")).display === "block");
      assert.match(await page.text("#headline"), /bank needs to confirm/);
      await page.screenshot(join(ARTIFACTS, `demo-plan-3ds-${name}.png`));
      await page.click("#authenticate");
      await page.waitForSelector("li[data-status=active]", 20000);
      assert.match(await page.text("#headline"), /Subscribed: your Studio plan is active/);
      const txn = (await page.text("#reference")).replace("Reference ", "");
      assert.match(txn, /^txn_/);
      const sub = (await ps.backend("GET", `/v1/transactions/${txn}`)).body;
      assert.equal(sub.kind, "subscription");
      assert.match(sub.stripe_id, /^sub_/);
      assert.ok(sub.current_period_end, JSON.stringify(sub));

      // Active is not an end: the merchant cancels, and the same stream brings canceled.
      assert.equal((await ps.backend("POST", `/v1/transactions/${txn}/cancel`, {})).status, 200);
      await page.waitForSelector("li[data-status=canceled]");
      assert.match(await page.text("#headline"), /canceled/);
      const seen = (await rows(page)).map((r) => r.status);
      assert.deepEqual(seen.filter((s, i) => s !== seen[i - 1]), ["incomplete", "active", "canceled"], JSON.stringify(seen));
      // Pay's stream (ended for confirm's) and one after the approval, which carried active and canceled.
      assert.equal(requests.filter((u) => /\/events(\?|$)/.test(u)).length, 2, JSON.stringify(requests));
      assert.deepEqual(polled(requests), [], "the page must not poll");
      await eventually(async () => (await ps.connections("sse")) === 0, "the stream to end at canceled");
      await page.screenshot(join(ARTIFACTS, `demo-plan-canceled-${name}.png`));
      await page.close();
    });

    test("the Studio plan with a declined card says so and lets the customer try again", async () => {
      const { page } = await open("/demo");
      await page.check("input[name=product][value=plan]");
      await page.check("input[value=decline]");
      await page.click("#pay");
      await page.waitForSelector(".status.bad");
      assert.match(await page.text("#headline"), /declined.*\. Try another card\.$/i);
      assert.equal(await page.text("#pay"), "Try again");
      await page.close();
    });

    test("hosted Checkout: pay on Stripe's page, come back to /demo/return, see the session paid", async () => {
      const { page, requests } = await open("/demo");
      await page.clickAndNavigate("#hosted", /\/demo\/hosted\/cs_/);
      await page.waitForFunction(() => !document.getElementById("hosted-pay").disabled);
      assert.match(await page.text("#amount"), /\$150\.00/);
      await page.check("input[value=visa]");
      await page.clickAndNavigate("#hosted-pay", /\/demo\/return\?session_id=cs_/);
      await page.waitForSelector("li[data-status=succeeded]");
      assert.equal(await page.text("#session-status"), "complete");
      assert.equal(await page.text("#payment-status"), "paid");
      assert.match(await page.text("#headline"), /Payment received/);
      const session = new URL(page.url()).searchParams.get("session_id");
      assert.ok(requests.some((u) => u.endsWith(`/v1/transactions/${session}/refresh`)), "the return page asked for a read");
      assert.deepEqual(polled(requests), [], "the page must not poll");
      await page.screenshot(join(ARTIFACTS, `demo-return-paid-${name}.png`));
      await page.close();
    });

    test("the demo's backend answers bad input with a precise 4xx", async () => {
      const get = async (path, init) => { const r = await fetch(`${ps.url}${path}`, init); return [r.status, (await r.json()).error?.code]; };
      const post = (body) => ({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      assert.deepEqual(await get("/demo/api/session-token?session_id=pi_123"), [400, "bad_request"]);
      assert.deepEqual(await get("/demo/api/session-token?session_id=cs_test_nosuchsession"), [404, "not_found"]);
      assert.deepEqual(await get("/demo/hosted/cs_test_nosuchsession/pay", post({ method: "visa" })), [404, "not_found"]);
      const created = await (await fetch(`${ps.url}/demo/api/hosted`, post({ product: "plan" }))).json();
      const session = created.url.split("/").at(-1);
      assert.deepEqual(await get(`/demo/hosted/${session}/pay`, post({ method: "bitcoin" })), [400, "bad_request"]);
      assert.deepEqual(await get("/demo/api/pay", post({ client_secret: "pi_1_secret_2", card: "visa" })), [404, "not_found"]);
      const home = await fetch(`${ps.url}/demo/return`, { redirect: "manual" });
      assert.equal(home.status, 303, "a return without a session goes back to the shop");
    });

    test("the return page shows the session change live: opened while unpaid, a bank debit settles after", async () => {
      // The customer returns (or opens the page again) before paying, then pays by SEPA
      // Debit in another tab: every change after the page loaded is pushed to it.
      const created = await (await fetch(`${ps.url}/demo/api/hosted`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ product: "revisions" }),
      })).json();
      const session = created.url.split("/").at(-1);
      const { page, requests } = await open(`/demo/return?session_id=${session}`);
      await page.waitForSelector("li[data-status=requires_payment_method]");
      assert.equal(await page.text("#session-status"), "open");
      await page.waitForFunction(() => !document.getElementById("transport").hidden);
      const paid = await fetch(`${ps.url}/demo/hosted/${session}/pay`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ method: "sepa" }),
      });
      assert.equal(paid.status, 200, await paid.text());
      await page.waitForSelector("li[data-status=succeeded]");
      const seen = await rows(page);
      assert.equal(seen[0].via, "snapshot");
      // Complete but unpaid (processing) then paid, or straight to paid if the debit settled
      // first; each pushed by Stripe's webhooks, after the page had loaded.
      assert.ok(["processing,succeeded", "succeeded"].includes(seen.slice(1).map((r) => r.status).join()), JSON.stringify(seen));
      assert.ok(seen.slice(1).every((r) => r.via === "webhook"), JSON.stringify(seen));
      assert.equal(await page.text("#payment-status"), "paid");
      assert.deepEqual(polled(requests), [], "the page must not poll");
      await page.screenshot(join(ARTIFACTS, `demo-return-live-${name}.png`));
      await page.close();
    });
  });
}
