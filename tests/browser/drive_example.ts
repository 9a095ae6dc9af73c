// The Playwright driver of the example app (examples/web, built with the
// @expense/auth-client tarball): Debian's headless Chromium clicks through it
// as two browsers of one user, against the real server.
//
// Usage: tsx drive_example.ts CONFIG_JSON
//   CONFIG_JSON: {"app": the page's origin, "api": the API's base URL,
//                 "mint": URL that answers a POST {email, name, nonce} with a
//                 development ID token, "email", "name", "chromium": executable}
//
// Google Identity Services is faked at the edge: an init script defines
// `window.google.accounts.id` before the app starts, records what the app passes
// to `initialize`, and renders a button that hands the callback the credential
// the driver minted for the nonce the app gave it. So the app's real sign-in
// code runs (useGoogleSignIn), and no request goes to Google (the driver
// refuses any, and reports them). The second browser signs in through the
// page's development form instead.
//
// It prints one JSON object: what each page showed after each step, and the
// API responses the browsers received (status, Retry-After, and the names, never
// the values, of the cookies sent). test_example_app.py asserts on it.

import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";

interface Config {
  app: string;
  api: string;
  mint: string;
  email: string;
  name: string;
  chromium: string;
}

// The few parts of Node's `process` used here, typed locally: the project has no @types/node.
interface NodeProcess {
  argv: string[];
  stdout: { write(text: string): boolean };
  stderr: { write(text: string): boolean };
  exit(code: number): never;
}
const proc = (globalThis as unknown as { process: NodeProcess }).process;

const DEADLINE_MS = 90_000;
const STEP_TIMEOUT_MS = 15_000;
const BROWSER_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--host-resolver-rules=MAP *.localhost 127.0.0.1",
];

/** What the fake GIS recorded in the page. */
interface FakeGisRecord {
  clientIds: string[];
  nonces: string[];
  buttonsRendered: number;
  disableAutoSelect: number;
  /** The credential the next click on the fake button hands to the callback. */
  nextCredential?: string;
}

/** Runs in the page before any of its scripts: a stand-in for `google.accounts.id`. */
function installFakeGis(): void {
  interface Config {
    client_id: string;
    nonce?: string;
    callback: (response: { credential: string; select_by: string }) => void;
  }
  const record = { clientIds: [] as string[], nonces: [] as string[], buttonsRendered: 0, disableAutoSelect: 0 };
  let config: Config | undefined;
  const id = {
    initialize(next: Config) {
      config = next;
      record.clientIds.push(next.client_id);
      record.nonces.push(next.nonce ?? "");
    },
    renderButton(parent: HTMLElement) {
      record.buttonsRendered += 1;
      const button = document.createElement("button");
      button.textContent = "Sign in with Google (fake)";
      button.dataset.testid = "fake-google-button";
      button.onclick = () => {
        const credential = (record as { nextCredential?: string }).nextCredential;
        if (config !== undefined && credential !== undefined) {
          config.callback({ credential, select_by: "btn" });
        }
      };
      parent.replaceChildren(button);
    },
    prompt() {},
    disableAutoSelect() {
      record.disableAutoSelect += 1;
    },
  };
  Object.assign(window, { google: { accounts: { id } }, fakeGis: record });
}

function fakeGis(page: Page): Promise<FakeGisRecord> {
  return page.evaluate(() => (window as unknown as { fakeGis: FakeGisRecord }).fakeGis);
}

/** One response of the API, as a browser received it. */
interface ApiResponse {
  browser: string;
  method: string;
  procedure: string;
  status: number;
  retryAfter: string | null;
  /** The names of the cookies the request carried. */
  cookiesSent: string[];
}

class Traffic {
  readonly responses: ApiResponse[] = [];
  readonly toGoogle: string[] = [];
  private readonly pending: Promise<void>[] = [];

  constructor(private readonly api: string) {}

  async watch(context: BrowserContext, browser: string): Promise<void> {
    // The app must not load GIS when the page already has it; refuse and report any attempt.
    await context.route(/^https:\/\/([a-z0-9-]+\.)*google\.com\//, (route) => {
      this.toGoogle.push(route.request().url());
      return route.abort();
    });
    context.on("response", (response) => {
      const url = response.url();
      if (!url.startsWith(this.api)) return;
      const entry: ApiResponse = {
        browser,
        method: response.request().method(),
        procedure: new URL(url).pathname,
        status: response.status(),
        retryAfter: null,
        cookiesSent: [],
      };
      this.responses.push(entry);
      // Header details arrive asynchronously; the entry keeps its place in the order.
      this.pending.push(
        (async () => {
          const sent = await response.request().allHeaders();
          entry.cookiesSent = (sent.cookie ?? "")
            .split(";")
            .map((pair) => pair.split("=")[0]?.trim() ?? "")
            .filter((name) => name !== "");
        entry.retryAfter = await response.headerValue("retry-after");
        })(),
      );
    });
  }

  /** Every response with its header details, once they have all arrived. */
  async all(): Promise<ApiResponse[]> {
    await Promise.all(this.pending);
    return this.responses;
  }

  /** A marker between steps, so the test can tell which step a response belongs to. */
  mark(step: string): number {
    return this.responses.push({ browser: "-", method: "STEP", procedure: step, status: 0, retryAfter: null, cookiesSent: [] });
  }
}

async function mint(config: Config, nonce: string): Promise<string> {
  const response = await fetch(config.mint, {
    method: "POST",
    body: JSON.stringify({ email: config.email, name: config.name, nonce }),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`minting a token failed: ${response.status} ${text}`);
  return text.trim();
}

/** What a page shows: its state and, when signed in, the profile and the lists. */
async function view(page: Page) {
  const app = page.getByTestId("app");
  await app.waitFor({ timeout: STEP_TIMEOUT_MS });
  const state = await app.getAttribute("data-state");
  if (state !== "signed-in") {
    const error = page.getByTestId("sign-in-error");
    return {
      state,
      signInError:
        (await error.count()) === 0
          ? null
          : {
              code: await error.getAttribute("data-code"),
              retryAfter: await error.getAttribute("data-retry-after"),
              text: await error.textContent(),
            },
    };
  }
  return {
    state,
    name: await page.getByTestId("user-name").textContent(),
    email: await page.getByTestId("user-email").textContent(),
    userId: await page.getByTestId("user-id").textContent(),
    sessions: await page.getByTestId("session").evaluateAll((items) =>
      items.map((item) => ({
        id: item.getAttribute("data-session-id"),
        current: item.getAttribute("data-current") === "true",
        text: item.textContent,
      })),
    ),
    events: await page.getByTestId("security-event").evaluateAll((items) => items.map((item) => item.getAttribute("data-kind"))),
  };
}

async function waitForState(page: Page, state: string): Promise<void> {
  await page.locator(`[data-testid="app"][data-state="${state}"]`).waitFor({ timeout: STEP_TIMEOUT_MS });
}

/** Waits until the session list shows `count` sessions and is not refetching. */
async function waitForSessions(page: Page, count: number): Promise<void> {
  await page.locator('[data-testid="sessions"][data-fetching="false"]').waitFor({ timeout: STEP_TIMEOUT_MS });
  await page.waitForFunction(
    (n) => document.querySelectorAll('[data-testid="session"]').length === n,
    count,
    { timeout: STEP_TIMEOUT_MS },
  );
}

/** Waits until the security events include one of `kind`. */
async function waitForEvent(page: Page, kind: string): Promise<void> {
  await page.locator(`[data-testid="security-event"][data-kind="${kind}"]`).first().waitFor({ timeout: STEP_TIMEOUT_MS });
}

/** Waits until the app has initialized GIS with a nonce other than `previous`; returns it. */
async function nextGisNonce(page: Page, previous: string | undefined): Promise<string> {
  await page.waitForFunction(
    (old) => {
      const nonces = (window as unknown as { fakeGis: FakeGisRecord }).fakeGis.nonces;
      const last = nonces[nonces.length - 1];
      return last !== undefined && last !== "" && last !== old;
    },
    previous,
    { timeout: STEP_TIMEOUT_MS },
  );
  await page.getByTestId("fake-google-button").waitFor({ timeout: STEP_TIMEOUT_MS });
  const nonces = (await fakeGis(page)).nonces;
  return nonces[nonces.length - 1] as string;
}

/** Signs in through the fake Google button with a token minted for the app's nonce. */
async function signInWithGoogle(page: Page, config: Config, nonce: string): Promise<void> {
  const token = await mint(config, nonce);
  await page.evaluate((credential) => {
    (window as unknown as { fakeGis: FakeGisRecord }).fakeGis.nextCredential = credential;
  }, token);
  await page.getByTestId("fake-google-button").click();
}

async function openApp(context: BrowserContext, config: Config): Promise<Page> {
  const page = await context.newPage();
  await page.goto(`${config.app}/`);
  return page;
}

async function newBrowser(browser: Browser, traffic: Traffic, name: string): Promise<BrowserContext> {
  const context = await browser.newContext();
  await context.addInitScript(installFakeGis);
  await traffic.watch(context, name);
  return context;
}

async function run(config: Config): Promise<Record<string, unknown>> {
  const started = Date.now();
  const browser = await chromium.launch({ executablePath: config.chromium, args: BROWSER_ARGS, timeout: 20_000 });
  try {
    const traffic = new Traffic(config.api);
    const result: Record<string, unknown> = { browserVersion: browser.version() };
    const consoleLines: string[] = [];

    // Browser A signs in with (fake) Google.
    const a = await newBrowser(browser, traffic, "A");
    const pageA = await openApp(a, config);
    pageA.on("console", (message) => consoleLines.push(`A ${message.type()}: ${message.text()}`));
    await waitForState(pageA, "signed-out");
    const firstNonce = await nextGisNonce(pageA, undefined);
    await pageA.getByTestId("dev-nonce").filter({ hasText: firstNonce }).waitFor({ timeout: STEP_TIMEOUT_MS });
    result.aBeforeSignIn = { ...(await view(pageA)), gis: await fakeGis(pageA), devNonce: await pageA.getByTestId("dev-nonce").textContent() };
    traffic.mark("a-sign-in");
    await signInWithGoogle(pageA, config, firstNonce);
    await waitForState(pageA, "signed-in");
    await waitForSessions(pageA, 1);
    await waitForEvent(pageA, "SIGN_IN");
    result.aSignedIn = await view(pageA);

    // Browser B signs in through the development form.
    const b = await newBrowser(browser, traffic, "B");
    const pageB = await openApp(b, config);
    pageB.on("console", (message) => consoleLines.push(`B ${message.type()}: ${message.text()}`));
    await waitForState(pageB, "signed-out");
    const nonceB = pageB.getByTestId("dev-nonce");
    await pageB.waitForFunction(
      () => (document.querySelector('[data-testid="dev-nonce"]')?.textContent ?? "…") !== "…",
      undefined,
      { timeout: STEP_TIMEOUT_MS },
    );
    traffic.mark("b-sign-in");
    await pageB.getByLabel("ID token").fill(await mint(config, (await nonceB.textContent()) ?? ""));
    await pageB.getByRole("button", { name: "Sign in", exact: true }).click();
    await waitForState(pageB, "signed-in");
    await waitForSessions(pageB, 2);
    result.bSignedIn = await view(pageB);

    // A sees both sessions and signs B out.
    traffic.mark("a-refresh");
    await pageA.getByTestId("refresh-sessions").click();
    await waitForSessions(pageA, 2);
    result.aBothSessions = await view(pageA);
    const bSession = ((result.bSignedIn as { sessions: { id: string; current: boolean }[] }).sessions.find((s) => s.current))?.id;
    traffic.mark("a-revoke");
    await pageA.locator(`[data-testid="session"][data-session-id="${bSession}"]`).getByTestId("revoke-session").click();
    await waitForSessions(pageA, 1);
    await waitForEvent(pageA, "SESSION_REVOKED");
    result.aAfterRevoke = await view(pageA);

    // B's next call is refused, and the app notices.
    traffic.mark("b-refresh");
    await pageB.getByTestId("refresh-sessions").click();
    await waitForState(pageB, "signed-out");
    result.bAfterRevoke = await view(pageB);
    result.bCookies = (await b.cookies(config.api)).map((c) => c.name);

    // A signs out.
    traffic.mark("a-sign-out");
    await pageA.getByTestId("sign-out").click();
    await waitForState(pageA, "signed-out");
    result.aSignedOut = await view(pageA);
    result.aCookies = (await a.cookies(config.api)).map((c) => c.name);

    // A third sign-in within the account's limit window is refused, with Retry-After.
    const thirdNonce = await nextGisNonce(pageA, firstNonce);
    result.thirdNonce = thirdNonce;
    traffic.mark("a-sign-in-again");
    await signInWithGoogle(pageA, config, thirdNonce);
    await pageA.getByTestId("sign-in-error").waitFor({ timeout: STEP_TIMEOUT_MS });
    result.aRateLimited = { ...(await view(pageA)), gis: await fakeGis(pageA) };

    // And after a reload A is still signed out.
    traffic.mark("a-reload");
    await pageA.reload();
    await waitForState(pageA, "signed-out");
    result.aReloaded = await view(pageA);

    result.traffic = await traffic.all();
    await a.close();
    await b.close();
    result.toGoogle = traffic.toGoogle;
    result.console = consoleLines;
    result.ms = Date.now() - started;
    return result;
  } finally {
    await browser.close();
  }
}

async function main(): Promise<void> {
  const raw = proc.argv[2];
  if (raw === undefined) throw new Error("usage: drive_example.ts CONFIG_JSON");
  const deadline = setTimeout(() => {
    proc.stderr.write(`drive_example.ts: no result after ${DEADLINE_MS} ms\n`);
    proc.exit(2);
  }, DEADLINE_MS);
  const result = await run(JSON.parse(raw) as Config);
  clearTimeout(deadline);
  proc.stdout.write(`${JSON.stringify(result)}\n`);
}

main().then(
  () => proc.exit(0),
  (err: unknown) => {
    proc.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    proc.exit(1);
  },
);
