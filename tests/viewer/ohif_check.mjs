// Drives OHIF in Debian's Chromium (playwright-core) through one study and writes screenshots
// and facts.json to the output folder; the Python test judges them. Steps, in order, from:
// source (open the study), photo (open its XC or DMS photograph), seg, sr, overlay, pmap. Exits 1 on
// any page error.
//   node ohif_check.mjs VIEWER_URL OUT_DIR SOURCE_SOP_UID STEP,STEP,...
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const [viewerUrl, outDir, sourceSopUid, stepList] = process.argv.slice(2);
const facts = { pageErrors: [], consoleErrors: [], httpErrors: [], steps: {} };
let current = 'start';
const save = () => writeFileSync(join(outDir, 'facts.json'), JSON.stringify(facts, null, 2));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
page.on('pageerror', (error) => facts.pageErrors.push(`${current}: ${error.message || error}`));
page.on('response', (response) => {
  if (response.status() >= 400) facts.httpErrors.push(`${current}: ${response.status()} ${response.url().slice(0, 300)}`);
});
page.on('requestfailed', (request) => facts.httpErrors.push(`${current}: failed ${request.url().slice(0, 300)}`));
page.on('console', (message) => {
  if (message.type() === 'error') facts.consoleErrors.push(`${current}: ${message.text().slice(0, 300)}`);
});

async function settle(ms = 3000) {
  await page.waitForLoadState('networkidle').catch(() => {});
  await page.waitForTimeout(ms);
}

async function answerYes() {
  const yes = page.getByRole('button', { name: 'Yes' });
  if (await yes.count()) {
    await yes.first().click();
    await settle(4000);
  }
}

// Where the source image lies on the page: its corners through cornerstone's own image-to-canvas
// transform, offset by the canvas's place on the page.
async function imageOnScreen() {
  return page.evaluate((sop) => {
    const { cornerstone } = window;
    for (const enabled of cornerstone.getEnabledElements()) {
      const viewport = enabled.viewport;
      const ids = viewport.getImageIds ? viewport.getImageIds() : [];
      const imageId = ids.find((id) => id.includes(sop));
      if (!imageId) continue;
      const rect = viewport.canvas.getBoundingClientRect();
      const toPage = ([x, y]) => {
        const world = cornerstone.utilities.imageToWorldCoords(imageId, [x, y]);
        const [cx, cy] = viewport.worldToCanvas(world);
        return [rect.left + cx, rect.top + cy];
      };
      const plane = cornerstone.metaData.get('imagePlaneModule', imageId) || {};
      const rows = plane.rows;
      const columns = plane.columns;
      return { rows, columns, topLeft: toPage([0, 0]), bottomRight: toPage([columns, rows]),
               viewportType: viewport.type };
    }
    return null;
  }, sourceSopUid);
}

// Pixels of a screenshot, inside the image's box, whose channels differ by more than 40 (the
// Python test's "coloured"), counted by the browser itself: Node has no PNG decoder here.
async function colouredPixels(png, box) {
  return page.evaluate(async ({ data, box }) => {
    const image = new Image();
    image.src = `data:image/png;base64,${data}`;
    await image.decode();
    const canvas = document.createElement('canvas');
    canvas.width = image.width;
    canvas.height = image.height;
    const context = canvas.getContext('2d');
    context.drawImage(image, 0, 0);
    const [x0, y0] = box.topLeft.map((v) => Math.max(0, Math.floor(v)));
    const x1 = Math.min(image.width, Math.ceil(box.bottomRight[0]));
    const y1 = Math.min(image.height, Math.ceil(box.bottomRight[1]));
    if (x1 <= x0 || y1 <= y0) return 0;
    const pixels = context.getImageData(x0, y0, x1 - x0, y1 - y0).data;
    let count = 0;
    for (let i = 0; i < pixels.length; i += 4) {
      const high = Math.max(pixels[i], pixels[i + 1], pixels[i + 2]);
      const low = Math.min(pixels[i], pixels[i + 1], pixels[i + 2]);
      if (high - low > 40) count += 1;
    }
    return count;
  }, { data: png.toString('base64'), box });
}

async function openSeries(modality, nth = 0) {
  await page.locator('[data-cy=series-modality-label]', { hasText: new RegExp(`^${modality}$`) })
    .nth(nth).dblclick();
  await settle(4000);
}

const steps = {
  async source() {
    await page.goto(viewerUrl);
    await page.waitForSelector('[data-cy=viewport-pane] canvas', { timeout: 90000 });
    await settle(5000);
    const skip = page.getByText('Skip all');
    if (await skip.count()) await skip.first().click();
    await settle(1000);
    await page.screenshot({ path: join(outDir, 'source.png') });
    return { image: await imageOnScreen() };
  },
  async photo() {
    // A photograph's study: OHIF may hang the overlay first; open the photograph itself.
    for (const modality of ['XC', 'DMS']) {
      const label = page.locator('[data-cy=series-modality-label]',
                                 { hasText: new RegExp(`^${modality}$`) });
      if (await label.count()) {
        await openSeries(modality);
        break;
      }
    }
    await page.screenshot({ path: join(outDir, 'source.png') });
    return { image: await imageOnScreen() };
  },
  async seg() {
    await openSeries('SEG');
    await answerYes();
    const load = page.getByRole('button', { name: 'LOAD' });
    if (await load.count()) {
      await load.first().click();
      await settle(4000);
      await answerYes();
    }
    await page.screenshot({ path: join(outDir, 'seg.png') });
    const toasts = await page.evaluate(() => Array.from(
      document.querySelectorAll('[data-sonner-toast], [role=status], .toast, [class*=notification]'))
      .map((e) => e.innerText).filter(Boolean));
    const segments = await page.evaluate(() => window.services.segmentationService
      .getSegmentations().map((s) => Object.keys(s.segments || {}).length));
    return { image: await imageOnScreen(), segments, toasts };
  },
  async sr() {
    await openSeries('SR');
    await page.screenshot({ path: join(outDir, 'sr.png') });
    // OHIF's badge has no LOAD button for an SR: run the command that button runs for a SEG.
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
    await page.screenshot({ path: join(outDir, 'sr-measurements.png') });
    // The right-hand side panel only: the viewport draws the same labels on the image.
    const panel = await page.evaluate(() => {
      const button = document.querySelector('[data-cy=trackedMeasurements-btn]');
      let node = button;
      while (node && !/Measurements \(\d+\)/.test(node.innerText || '')) node = node.parentElement;
      return node ? node.innerText : '';
    });
    return { hydrated, panel };
  },
  async overlay() {
    await page.locator('[data-cy=series-description-label]', { hasText: /saliency overlay/ })
      .first().dblclick();
    await settle(4000);
    await page.screenshot({ path: join(outDir, 'overlay.png') });
    // What the viewport says about the displayed image set (OHIF shows "I: n (k/N)").
    const viewportText = await page.evaluate(() => {
      const pane = document.querySelector('[data-cy=viewport-pane]') || document.body;
      return pane.innerText;
    });
    return { viewportText };
  },
  async pdf() {
    await openSeries('DOC');
    await page.waitForFunction(() => {
      const element = document.querySelector('object[type="application/pdf"]');
      return element && element.getAttribute('data');
    }, null, { timeout: 60000 });
    await settle(2000);
    await page.screenshot({ path: join(outDir, 'pdf.png') });
    // OHIF's PDF viewport embeds the document the DICOM object carries (headless Chromium has
    // no PDF plug-in to paint it): fetch what it embedded, as the plug-in would.
    const embedded = await page.evaluate(async () => {
      const pane = document.querySelector('[data-cy=viewport-pane]') || document.body;
      const element = pane.querySelector('object[type="application/pdf"], embed, iframe');
      if (!element) return null;
      const url = element.getAttribute('data') || element.getAttribute('src');
      const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
      let binary = '';
      for (let i = 0; i < bytes.length; i += 1) binary += String.fromCharCode(bytes[i]);
      return { tag: element.tagName, type: element.getAttribute('type'), url,
               base64: btoa(binary) };
    });
    if (embedded) {
      writeFileSync(join(outDir, 'pdf-from-ohif.pdf'), Buffer.from(embedded.base64, 'base64'));
      delete embedded.base64;
    }
    return { embedded };
  },
  async pmap() {
    await openSeries('PMAP');
    await answerYes();
    await page.waitForFunction(() => {
      const pmap = window.services.displaySetService.getActiveDisplaySets()
        .find((d) => d.Modality === 'PMAP');
      return pmap && pmap.isLoaded;
    }, null, { timeout: 90000 });
    // Loaded is not drawn: wait until the viewport holds the map's actor beside the source's
    // (under load the fusion can lag the display set by seconds).
    const fused = () => window.cornerstone.getEnabledElements().some(
      (enabled) => enabled.viewport.getActors && enabled.viewport.getActors().length >= 2);
    await page.waitForFunction(fused, null, { timeout: 90000 }).catch(() => {});
    await settle(3000);
    // Drawn is not painted either: under load the map's colours can reach the canvas seconds
    // after its actor. Render again and look until the image shows a map's worth of colour
    // (the viewport's own coloured widgets hold a few thousand pixels), for up to 30 s.
    const box = await imageOnScreen();
    for (let tries = 0; tries < 10; tries += 1) {
      const shot = await page.screenshot({ path: join(outDir, 'pmap.png') });
      if (!box || (await colouredPixels(shot, box)) > 10000) break;
      await page.evaluate(() => window.cornerstone.getEnabledElements()
        .forEach((enabled) => enabled.viewport.render()));
      await settle(3000);
    }
    const actors = await page.evaluate(() => Math.max(0, ...window.cornerstone.getEnabledElements()
      .map((enabled) => (enabled.viewport.getActors ? enabled.viewport.getActors().length : 0))));
    return { image: await imageOnScreen(), actors };
  },
};

for (const name of stepList.split(',')) {
  current = name;
  const record = { ok: false };
  facts.steps[name] = record;
  try {
    Object.assign(record, (await steps[name]()) || {});
    record.ok = true;
  } catch (error) {
    record.error = String((error && error.stack) || error);
  }
  save();
}
await browser.close();
process.exit(facts.pageErrors.length ? 1 : 0);
