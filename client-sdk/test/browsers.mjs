// The browsers the page tests run in: Debian's Chromium through playwright-core, and
// Debian's Firefox ESR through puppeteer-core over WebDriver BiDi. Each is wrapped in the
// same small page API, so one test runs in both.

import { existsSync } from "node:fs";

const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];

export const BROWSERS = [
  { name: "chromium", path: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium", apt: "chromium", launch: launchChromium },
  { name: "firefox", path: process.env.FIREFOX_PATH ?? "/usr/bin/firefox-esr", apt: "firefox-esr", launch: launchFirefox },
];

/** Why a browser's tests are skipped: only its binary missing outside CI (.ci/run installs it). */
export function skipReason(browser) {
  return !existsSync(browser.path) && !process.env.CI
    ? `no ${browser.name} at ${browser.path} (apt-get install ${browser.apt})` : false;
}

async function launchChromium(path) {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({ executablePath: path, args: CHROMIUM_ARGS });
  return {
    async newPage(viewport = { width: 1100, height: 760 }) {
      const page = await browser.newPage({ viewport });
      return {
        raw: page,
        goto: (url) => page.goto(url),
        click: (sel) => page.click(sel),
        check: (sel) => page.check(sel),
        text: (sel) => page.textContent(sel),
        visible: (sel) => page.isVisible(sel),
        evaluate: (fn, arg) => page.evaluate(fn, arg),
        evalAll: (sel, fn) => page.$$eval(sel, fn),
        waitForSelector: (sel, timeout = 15000) => page.waitForSelector(sel, { timeout }),
        waitForFunction: (fn, arg, timeout = 15000) => page.waitForFunction(fn, arg, { timeout }),
        /** Click, then wait for the page it leads to (a location.assign after a fetch). */
        clickAndNavigate: (sel, url, timeout = 15000) => Promise.all([page.waitForURL(url, { timeout }), page.click(sel)]),
        url: () => page.url(),
        onRequest: (fn) => page.on("request", (r) => fn(r.url())),
        screenshot: (path) => page.screenshot({ path }),
        close: () => page.close(),
      };
    },
    close: () => browser.close(),
  };
}

async function launchFirefox(path) {
  const { default: puppeteer } = await import("puppeteer-core");
  const browser = await puppeteer.launch({ browser: "firefox", executablePath: path, protocol: "webDriverBiDi", headless: true });
  return {
    async newPage(viewport = { width: 1100, height: 760 }) {
      const page = await browser.newPage();
      await page.setViewport(viewport);
      const visible = (sel) => page.$eval(sel, (el) => {
        const style = getComputedStyle(el);
        return style.visibility !== "hidden" && el.getClientRects().length > 0;
      }).catch(() => false);
      return {
        raw: page,
        goto: (url) => page.goto(url),
        click: (sel) => page.click(sel),
        check: (sel) => page.click(sel),
        text: (sel) => page.$eval(sel, (el) => el.textContent),
        visible,
        evaluate: (fn, arg) => page.evaluate(fn, arg),
        evalAll: (sel, fn) => page.$$eval(sel, fn),
        waitForSelector: (sel, timeout = 15000) => page.waitForSelector(sel, { timeout }),
        waitForFunction: (fn, arg, timeout = 15000) => page.waitForFunction(fn, { timeout, polling: 50 }, arg),
        clickAndNavigate: async (sel, url, timeout = 15000) => {
          await Promise.all([page.waitForNavigation({ timeout }), page.click(sel)]);
          if (!url.test(page.url())) throw new Error(`navigated to ${page.url()}, not ${url}`);
        },
        url: () => page.url(),
        onRequest: (fn) => page.on("request", (r) => fn(r.url())),
        screenshot: (path) => page.screenshot({ path }),
        close: () => page.close(),
      };
    },
    close: () => browser.close(),
  };
}
