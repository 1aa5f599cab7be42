// Open the real ComfyUI frontend headless, load each UI-format workflow with window.app.loadGraphData and
// report the node types the frontend does not know (what a user sees as "Missing node").
// usage: node check_workflows.cjs <server url> <workflow.json>...   (HEADROOM_PLAYWRIGHT_DIR = node_modules
// holding playwright-core; CHROMIUM = browser binary, default /usr/bin/chromium). Prints one JSON line.
const path = require("path");
const fs = require("fs");
const { chromium } = require(path.join(process.env.HEADROOM_PLAYWRIGHT_DIR, "playwright-core"));

(async () => {
  const [url, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const result = { workflows: {}, errors: [] };
  try {
    const page = await browser.newPage();
    page.on("pageerror", (e) => result.errors.push(String(e)));
    await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
      Object.keys(window.LiteGraph.registered_node_types || {}).length > 50, null, { timeout: 180000 });
    for (const file of files) {
      const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
      const report = await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf);
        const known = window.LiteGraph.registered_node_types;
        const types = wf.nodes.map((n) => n.type);
        const loaded = (window.app.graph._nodes || window.app.graph.nodes || []).map((n) => n.type);
        return { missing: types.filter((t) => !(t in known)), nodes: types.length, loaded: loaded.length };
      }, workflow);
      result.workflows[path.basename(file)] = report;
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
})().catch((e) => { console.log(JSON.stringify({ fatal: String(e && e.stack || e) })); process.exit(1); });
