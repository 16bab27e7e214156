// Loads a page in headless Chromium with playwright-core and prints what it found as JSON (see
// scripts/browser, which runs this with NODE_PATH and CHROMIUM set).
const path = require("path");
const { chromium } = require("playwright-core");

async function main() {
  const [file, flag, screenshot] = process.argv.slice(2);
  if (!file || (flag && (flag !== "--screenshot" || !screenshot))) {
    throw new Error("usage: browser-check.cjs FILE.html [--screenshot FILE.png]");
  }
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    // As root in a container, and with no network beyond loopback: no sandbox, no GPU, no
    // background calls home.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
    const errors = [];
    page.on("console", (message) => {
      if (message.type() === "error") errors.push(`console: ${message.text()}`);
    });
    page.on("pageerror", (error) => errors.push(`page: ${error.message}`));
    page.on("requestfailed", (request) => errors.push(`request: ${request.url()} ${request.failure()?.errorText}`));
    await page.goto("file://" + path.resolve(file), { waitUntil: "load" });
    const found = await page.evaluate(() => ({
      title: document.title,
      figures: Array.from(document.querySelectorAll("figure")).map((figure) => {
        const svg = figure.querySelector("svg");
        const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
        const lines = svg
          ? Array.from(svg.querySelectorAll("polyline")).map((line) => line.points.numberOfItems).filter((n) => n >= 3)
          : [];
        return {
          id: figure.id,
          width: box.width,
          height: box.height,
          lines: lines.length,
          points: lines.reduce((a, b) => a + b, 0),
          texts: svg ? svg.querySelectorAll("text").length : 0,
        };
      }),
    }));
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ ...found, errors }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(`browser-check: ${error.stack || error}`);
  process.exit(1);
});
