#!/usr/bin/env node
// Open the page in headless Chromium (puppeteer-core driving an installed browser, e.g.
// Debian's /usr/bin/chromium), let it embed the sentences, and print its result as JSON.
//
//   node run-page.js --url http://127.0.0.1:8000/web/ --sentences sentences.json

import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import puppeteer from "puppeteer-core";

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    sentences: { type: "string" },
    chromium: { type: "string", default: process.env.CHROMIUM ?? "/usr/bin/chromium" },
    threads: { type: "string", default: "2" },
    runs: { type: "string", default: "20" },
    timeout: { type: "string", default: "240" },
  },
});
if (!values.url || !values.sentences) {
  console.error("usage: node run-page.js --url URL --sentences FILE.json [--chromium PATH] [--threads N] [--runs N]");
  process.exit(2);
}
const sentences = await readFile(values.sentences, "utf8");
const page = new URL(values.url);
page.search = new URLSearchParams({
  autorun: "1",
  sentences,
  threads: values.threads,
  runs: values.runs,
}).toString();

// A fresh profile and no background traffic: the run depends on nothing but the local server.
const profile = await mkdtemp(path.join(os.tmpdir(), "lrt-chromium-"));
const browser = await puppeteer.launch({
  executablePath: values.chromium,
  headless: true,
  userDataDir: profile,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    // Makes performance.measureUserAgentSpecificMemory() answer at once instead of at the next GC.
    "--enable-blink-features=ForceEagerMeasureMemory",
  ],
});
try {
  const tab = await browser.newPage();
  const messages = [];
  tab.on("console", (message) => messages.push(`${message.type()}: ${message.text()}`));
  tab.on("pageerror", (error) => messages.push(`pageerror: ${error.message}`));
  await tab.goto(page.toString(), { waitUntil: "load" });
  try {
    await tab.waitForFunction("window.lrtResult !== undefined", {
      timeout: Number(values.timeout) * 1000,
      polling: 200,
    });
  } catch (error) {
    throw new Error(`${error.message}\npage console:\n${messages.join("\n")}`);
  }
  const result = await tab.evaluate(() => window.lrtResult);
  result.browser = await browser.version();
  result.console = messages;
  console.log(JSON.stringify(result));
  if (result.error) process.exitCode = 1;
} finally {
  await browser.close();
  await rm(profile, { recursive: true, force: true });
}
