// Drives OHIF in Debian's Chromium (playwright-core) through one study: the source image, the
// SEG, the SR with its measurement panel, and the Parametric Map. Writes screenshots and
// facts.json to the output folder; the Python test judges them. Exits 1 on a page error.
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const [viewerUrl, outDir, sourceSopUid] = process.argv.slice(2);
const facts = { pageErrors: [], consoleErrors: [], steps: [] };
let current = 'start';
const save = () => writeFileSync(join(outDir, 'facts.json'), JSON.stringify(facts, null, 2));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
page.on('pageerror', (error) => facts.pageErrors.push(`${current}: ${error.message || error}`));
page.on('console', (message) => {
  if (message.type() === 'error') facts.consoleErrors.push(`${current}: ${message.text().slice(0, 300)}`);
});

async function settle(ms = 3000) {
  await page.waitForLoadState('networkidle').catch(() => {});
  await page.waitForTimeout(ms);
}

// Where the source image lies on the page: its four corners through cornerstone's own
// image-to-canvas transform, offset by the canvas's place in the page.
async function imageOnScreen() {
  return page.evaluate((sop) => {
    const { cornerstone } = window;
    const element = cornerstone.getEnabledElements().find((e) => {
      const id = e.viewport.getCurrentImageId && e.viewport.getCurrentImageId();
      return id && (!sop || id.includes(sop));
    });
    if (!element) return null;
    const viewport = element.viewport;
    const imageId = viewport.getCurrentImageId();
    const image = cornerstone.cache.getImage(imageId) || {};
    const rows = image.rows || image.height;
    const columns = image.columns || image.width;
    const rect = viewport.canvas.getBoundingClientRect();
    const toPage = ([x, y]) => {
      const world = cornerstone.utilities.imageToWorldCoords(imageId, [x, y]);
      const [cx, cy] = viewport.worldToCanvas(world);
      return [rect.left + cx, rect.top + cy];
    };
    return { rows, columns, topLeft: toPage([0, 0]), bottomRight: toPage([columns, rows]),
             imageId };
  }, sourceSopUid);
}

async function step(name, action) {
  current = name;
  const record = { name, ok: false };
  facts.steps.push(record);
  try {
    Object.assign(record, (await action()) || {});
    record.ok = true;
  } catch (error) {
    record.error = String(error && error.stack || error);
  }
  save();
}

await step('open', async () => {
  await page.goto(viewerUrl);
  await page.waitForSelector('[data-cy=viewport-pane] canvas', { timeout: 60000 });
  await settle(5000);
  const skip = page.getByText('Skip all');
  if (await skip.count()) await skip.first().click();
  await settle(1000);
  await page.screenshot({ path: join(outDir, '1-source.png') });
  return { image: await imageOnScreen() };
});

await step('seg', async () => {
  await page.locator('[data-cy=series-modality-label]', { hasText: /^SEG$/ }).first().dblclick();
  await settle(3000);
  const yes = page.getByRole('button', { name: 'Yes' });
  if (await yes.count()) await yes.first().click();
  await settle(5000);
  await page.screenshot({ path: join(outDir, '2-seg.png') });
  return { image: await imageOnScreen() };
});

await step('sr', async () => {
  await page.locator('[data-cy=series-modality-label]', { hasText: /^SR$/ }).first().dblclick();
  await settle(5000);
  await page.screenshot({ path: join(outDir, '3-sr.png') });
  // The LOAD action of OHIF's viewport badge: the command its button runs for SEG, for the SR.
  const hydrated = await page.evaluate(async () => {
    const sr = window.services.displaySetService.getActiveDisplaySets()
      .find((d) => d.Modality === 'SR');
    await window.commandsManager.runCommand('hydrateSecondaryDisplaySet',
                                            { displaySet: sr, viewportId: 'default' });
    return Boolean(sr.isHydrated);
  });
  await settle(3000);
  await page.locator('[data-cy=trackedMeasurements-btn]').click();
  await settle(2000);
  await page.screenshot({ path: join(outDir, '4-measurements.png') });
  const panel = await page.evaluate(() => document.body.innerText);
  return { hydrated, panel };
});

await step('pmap', async () => {
  await page.locator('[data-cy=series-modality-label]', { hasText: /^PMAP$/ }).first().dblclick();
  await settle(3000);
  const yes = page.getByRole('button', { name: 'Yes' });
  if (await yes.count()) await yes.first().click();
  await settle(5000);
  await page.screenshot({ path: join(outDir, '5-pmap.png') });
  return { image: await imageOnScreen() };
});

save();
await browser.close();
process.exit(facts.pageErrors.length ? 1 : 0);
