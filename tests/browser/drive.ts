// The Playwright driver: Debian's headless Chromium runs the test page
// (web/app.ts) from several origins against the real server.
//
// Usage: tsx drive.ts CONFIG_JSON
//   CONFIG_JSON: {"api": API base URL, "app": allowed page origin,
//                 "sibling": a same-site page origin that is not allowed,
//                 "evil": a cross-site page origin, "chromium": executable path}
//   Every page origin serves index.html and app.js.
//   The environment holds the Google ID token as EXPENSE_AUTH_TOKEN (never in
//   argv, so it does not show in `ps`).
//
// One browser context is one user's browser: it signs in on the allowed page,
// then visits the other pages while signed in. It prints one JSON object with
// each step's outcome, the cookies the browser holds (without values), and the
// browser's own record of the API traffic (DevTools protocol: the headers on the
// wire, the status the server answered, CORS verdicts) and console messages;
// test_browser.py asserts on it. Cookie values and the token are never printed.

import { chromium, type BrowserContext, type Page } from "playwright-core";

import type { ExpenseAuthPage, Outcome, Protocol } from "./web/app.js";

interface Config {
  api: string;
  app: string;
  sibling: string;
  evil: string;
  chromium: string;
}

// The few parts of Node's `process` used here, typed locally: the project has no @types/node.
interface NodeProcess {
  argv: string[];
  env: Record<string, string | undefined>;
  stdout: { write(text: string): boolean };
  stderr: { write(text: string): boolean };
  exit(code: number): never;
}
const proc = (globalThis as unknown as { process: NodeProcess }).process;

const DEADLINE_MS = 45_000;
const SESSION_COOKIE = "expense_session";
const SIGN_OUT = "/expense.auth.v1.AuthService/SignOut";
const BROWSER_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  // Chromium resolves *.localhost to loopback itself; pinning IPv4 spares a
  // refused ::1 attempt, since the servers listen on 127.0.0.1 only.
  "--host-resolver-rules=MAP *.localhost 127.0.0.1",
];

/** One request to the API, as Chromium's network stack reported it (DevTools protocol). */
interface Exchange {
  page: string;
  method: string;
  url: string;
  /** Chromium's resource type: "Fetch", "Document", "Other" (a CORS preflight), ... */
  type: string;
  /** The headers Chromium put on the wire; for cookies only the names it sent. */
  sent?: { cookies: string[]; headers: Record<string, string> };
  /** The status the server answered, also when CORS then hid the answer. */
  status?: number;
  received?: Record<string, string>;
  failed?: { errorText: string; corsError?: string; failedParameter?: string; blockedReason?: string };
}

const SENT_HEADERS_SHOWN = [
  "origin",
  "sec-fetch-site",
  "sec-fetch-mode",
  "content-type",
  "connect-protocol-version",
  "access-control-request-method",
  "access-control-request-headers",
];

function pageOrigin(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return url;
  }
}

function lowerKeys(headers: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
}

/** The response headers that decide what a page may see; a Set-Cookie without its value. */
function receivedHeaders(raw: Record<string, string>): Record<string, string> {
  const shown: Record<string, string> = {};
  for (const [name, value] of Object.entries(lowerKeys(raw))) {
    if (name.startsWith("access-control-") || name.startsWith("grpc-") || name === "cross-origin-resource-policy") {
      shown[name] = value;
    } else if (name === "set-cookie") {
      shown[name] = value.replace(/=[^;]*/g, "=<value>");
    }
  }
  return shown;
}

/** Records the API traffic of every page it is attached to, and all console messages. */
class Recorder {
  readonly exchanges = new Map<string, Exchange>();
  readonly console: { page: string; type: string; text: string }[] = [];

  constructor(
    context: BrowserContext,
    private readonly apiOrigin: string,
  ) {
    context.on("console", (message) => {
      this.console.push({ page: pageOrigin(message.page()?.url() ?? ""), type: message.type(), text: message.text() });
    });
  }

  /** Opens a page whose traffic is recorded from its first request on. */
  async newPage(context: BrowserContext): Promise<Page> {
    const page = await context.newPage();
    const cdp = await context.newCDPSession(page);
    const entry = (id: string) => this.exchanges.get(id);
    cdp.on("Network.requestWillBeSent", (e) => {
      if (!e.request.url.startsWith(this.apiOrigin)) return;
      this.exchanges.set(e.requestId, {
        ...this.exchanges.get(e.requestId),
        page: pageOrigin(e.documentURL),
        method: e.request.method,
        url: e.request.url,
        type: e.type ?? "",
      });
    });
    // The ExtraInfo events may come before or after requestWillBeSent: keep partial entries.
    cdp.on("Network.requestWillBeSentExtraInfo", (e) => {
      const headers = lowerKeys(e.headers as Record<string, string>);
      const shown = Object.fromEntries(SENT_HEADERS_SHOWN.filter((h) => h in headers).map((h) => [h, headers[h]]));
      const cookies = e.associatedCookies.filter((c) => c.blockedReasons.length === 0).map((c) => c.cookie.name);
      this.exchanges.set(e.requestId, { ...(entry(e.requestId) as Exchange), sent: { cookies, headers: shown } });
    });
    cdp.on("Network.responseReceivedExtraInfo", (e) => {
      this.exchanges.set(e.requestId, {
        ...(entry(e.requestId) as Exchange),
        status: e.statusCode,
        received: receivedHeaders(e.headers as Record<string, string>),
      });
    });
    cdp.on("Network.loadingFailed", (e) => {
      const known = entry(e.requestId);
      if (known === undefined) return;
      known.failed = {
        errorText: e.errorText,
        ...(e.corsErrorStatus && {
          corsError: e.corsErrorStatus.corsError,
          failedParameter: e.corsErrorStatus.failedParameter,
        }),
        ...(e.blockedReason && { blockedReason: e.blockedReason }),
      };
    });
    await cdp.send("Network.enable");
    return page;
  }

  /** The API requests, in the order Chromium reported them (extra-info-only entries dropped). */
  traffic(): Exchange[] {
    return [...this.exchanges.values()]
      .filter((x) => x.url !== undefined)
      .map((x) => {
        // A preflight's document is the API URL itself: name the page by its Origin header.
        const origin = x.sent?.headers.origin;
        return origin !== undefined && origin !== "null" ? { ...x, page: origin } : x;
      });
  }
}

async function openPage(recorder: Recorder, context: BrowserContext, origin: string, api: string): Promise<Page> {
  const page = await recorder.newPage(context);
  await page.goto(`${origin}/index.html?api=${encodeURIComponent(api)}`);
  await page.waitForFunction(() => "expenseAuth" in window, undefined, { timeout: 10_000 });
  return page;
}

type StepName = Exclude<keyof ExpenseAuthPage, "origin" | "apiBase" | "documentCookie">;

/** Runs one step of window.expenseAuth in the page. */
function step<T>(page: Page, name: StepName, protocol?: Protocol, arg?: string): Promise<Outcome<T>> {
  return page.evaluate(
    async ([name, protocol, arg]) => {
      const api = window.expenseAuth as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
      return (arg === undefined ? api[name](protocol) : api[name](arg, protocol)) as Promise<never>;
    },
    [name, protocol, arg] as const,
  ) as Promise<Outcome<T>>;
}

/** The session cookie as the browser stores it, without its value. */
async function sessionCookies(context: BrowserContext, api: string) {
  return (await context.cookies(api))
    .filter((c) => c.name === SESSION_COOKIE)
    .map((c) => ({
      name: c.name,
      domain: c.domain,
      path: c.path,
      httpOnly: c.httpOnly,
      secure: c.secure,
      sameSite: c.sameSite,
      valueLength: c.value.length,
    }));
}

/** What a script on `origin` (already open in `page`) can do with the user's cookie. */
async function attacks(page: Page) {
  return {
    getCurrentUser: await step(page, "getCurrentUser"),
    // A Connect GET needs no preflight: the request goes out, the response must stay unreadable.
    getCurrentUserByGet: await step(page, "getCurrentUser", "connect-get"),
    getSessionGrpcWeb: await step(page, "getSession", "grpc-web"),
    signOut: await step(page, "signOut"),
    revokeOtherSessions: await step(page, "revokeOtherSessions"),
    noCorsSignOut: await step(page, "noCorsPost", undefined, SIGN_OUT),
  };
}

async function run(config: Config, token: string): Promise<Record<string, unknown>> {
  const started = Date.now();
  const browser = await chromium.launch({ executablePath: config.chromium, args: BROWSER_ARGS, timeout: 20_000 });
  try {
    const context = await browser.newContext();
    const recorder = new Recorder(context, config.api);
    const result: Record<string, unknown> = { browserVersion: browser.version(), launchMs: Date.now() - started };

    const app = await openPage(recorder, context, config.app, config.api);
    result.appOrigin = await app.evaluate(() => window.expenseAuth.origin);
    result.beforeSignIn = await step(app, "getSession");
    result.signIn = await step(app, "signIn", undefined, token);
    result.getCurrentUser = await step(app, "getCurrentUser");
    result.getCurrentUserByGet = await step(app, "getCurrentUser", "connect-get");
    result.getSession = await step(app, "getSession");
    result.getSessionGrpcWeb = await step(app, "getSession", "grpc-web");
    result.listSessions = await step(app, "listSessions");
    result.appDocumentCookie = await app.evaluate(() => window.expenseAuth.documentCookie());
    result.storedCookies = await sessionCookies(context, config.api);

    // HttpOnly, checked where it matters: a script on the API's own origin. A
    // control cookie without HttpOnly shows that the probe would see a cookie.
    await context.addCookies([{ name: "probe", value: "visible", url: config.api }]);
    const apiPage = await recorder.newPage(context);
    await apiPage.goto(`${config.api}/`);
    result.apiOriginProbe = await apiPage.evaluate(() => ({ origin: location.origin, cookie: document.cookie }));
    await apiPage.close();
    await context.clearCookies({ name: "probe" });

    // The signed-in user visits other pages.
    const sibling = await openPage(recorder, context, config.sibling, config.api);
    result.sibling = { origin: await sibling.evaluate(() => window.expenseAuth.origin), ...(await attacks(sibling)) };
    const evil = await openPage(recorder, context, config.evil, config.api);
    result.evil = { origin: await evil.evaluate(() => window.expenseAuth.origin), ...(await attacks(evil)) };

    // Nothing they sent changed the session.
    result.afterAttacks = {
      getSession: await step(app, "getSession"),
      listSessions: await step(app, "listSessions"),
    };

    result.signOut = await step(app, "signOut");
    result.cookiesAfterSignOut = await sessionCookies(context, config.api);
    result.afterSignOut = await step(app, "getSession");
    result.afterSignOutGrpcWeb = await step(app, "getSession", "grpc-web");

    result.stepsMs = Date.now() - started;
    result.traffic = recorder.traffic();
    result.console = recorder.console;
    await context.close();
    return result;
  } finally {
    await browser.close();
  }
}

async function main(): Promise<void> {
  const raw = proc.argv[2];
  const token = proc.env.EXPENSE_AUTH_TOKEN;
  if (raw === undefined || !token) {
    throw new Error("usage: EXPENSE_AUTH_TOKEN=... drive.ts CONFIG_JSON");
  }
  const config = JSON.parse(raw) as Config;
  const deadline = setTimeout(() => {
    proc.stderr.write(`drive.ts: no result after ${DEADLINE_MS} ms\n`);
    proc.exit(2);
  }, DEADLINE_MS);
  const result = await run(config, token);
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
