// The demo checkout as a customer sees it, on a desktop and on a phone-sized screen, in
// real headless Chromium (Debian's, through playwright-core) and Firefox ESR (puppeteer-core
// over WebDriver BiDi): what it says must be true and readable (issue 22, item 21).

import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { BROWSERS, skipReason } from "./browsers.mjs";
import { ARTIFACTS, Paystream, startLocalStripe } from "./helpers.mjs";

const PHONE = { width: 390, height: 844 };

for (const browserInfo of BROWSERS) {
  const { name, path, launch } = browserInfo;
  const skip = skipReason(browserInfo);
  describe(name, { skip }, () => {
    let browser, stripe, ps;

    before(async () => {
      if (skip) return;
      browser = await launch(path);
      stripe = await startLocalStripe();
      ps = await (await Paystream.create({ STRIPE_API_BASE: stripe.url })).start();
      await stripe.registerWebhook(`${ps.url}/v1/stripe/webhook`, ps.secrets.STRIPE_WEBHOOK_SECRET);
    });
    after(async () => {
      await browser?.close();
      await ps?.stop();
      stripe?.stop();
    });

    async function openDemo(viewport = { width: 1100, height: 760 }) {
      const page = await browser.newPage(viewport);
      await page.goto(`${ps.url}/demo`);
      await page.waitForFunction(() => document.getElementById("available").textContent !== "…");
      return page;
    }

    const rows = (page) => page.evalAll("#timeline li", (lis) => lis.map((li) => ({
      status: li.dataset.status, label: li.children[1].children[0].textContent, via: li.querySelector(".via").textContent,
    })));

    test("before paying, no empty transport badge and no missing-SDK warning show", async () => {
      const page = await openDemo(PHONE);
      assert.equal(await page.visible("#transport"), false, "the badge is empty until a transport connects");
      assert.equal(await page.visible("#nosdk"), false, "this checkout has its SDK bundle");
      await page.screenshot(join(ARTIFACTS, `demo-390-before-pay-${name}.png`));
      await page.close();
    });

    test("a decline reads as one sentence, and its timeline row says declined", async () => {
      const page = await openDemo();
      await page.check("input[value=decline]");
      await page.click("#pay");
      await page.waitForSelector(".status.bad", 15000);
      const headline = await page.text("#headline");
      assert.doesNotMatch(headline, /\.\./, headline);
      assert.match(headline, /declined\. Try another card\.$/, headline);
      await page.waitForFunction(() => document.querySelectorAll("#timeline li").length >= 2);
      const seen = await rows(page);
      assert.equal(seen.at(-1).label, "Card declined", JSON.stringify(seen));
      assert.ok(seen.slice(1).every((r) => r.label !== "Waiting for payment"), JSON.stringify(seen));
      assert.equal(await page.visible("#transport"), true, "the badge names the transport once connected");
      await page.screenshot(join(ARTIFACTS, `demo-declined-row-${name}.png`));
      await page.close();
    });

    test("on a 390 px screen the status is in view after Pay; each row says where it came from", async () => {
      const page = await openDemo(PHONE);
      await page.check("input[value=visa]");
      await page.click("#pay");
      await page.waitForSelector("li[data-status=succeeded]", 15000);
      await page.waitForFunction(() => {
        const box = document.getElementById("status").getBoundingClientRect();
        return box.top >= 0 && box.bottom <= window.innerHeight;
      }, null, 5000);
      const seen = await rows(page);
      const cause = await page.evaluate(() => window.lastCause);
      assert.equal(seen.at(-1).via, cause === "paystream.refresh" ? "refresh" : "webhook", JSON.stringify({ seen, cause }));
      assert.ok(seen.every((r) => ["", "refresh", "webhook"].includes(r.via)), JSON.stringify(seen));
      // The explanation names both sources rather than crediting every status to the webhook.
      const note = await page.text("#timeline + p");
      assert.match(note, /refresh/);
      assert.match(note, /webhook/);
      await page.screenshot(join(ARTIFACTS, `demo-390-after-pay-${name}.png`));
      await page.close();
    });
  });
}
