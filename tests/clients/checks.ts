// Checks of @expense/auth-client's framework-free parts, run by tsx in Node
// with a fake `fetch` (the transport's only edge) and a fake Google Identity
// Services: the transport preset, the error checks, the sign-in flow.
//
// Usage: tsx checks.ts
//   Prints one JSON object, {case name: "ok" | failure message};
//   test_package.py asserts on it, one test per case. The browser path (and the
//   React hooks) are proven against the real server by tests/browser/test_example_app.py.

import { Code, ConnectError, createClient } from "@connectrpc/connect";

import {
  AuthService,
  createExpenseAuthTransport,
  createSignInNonce,
  initializeGoogleSignIn,
  isResourceExhausted,
  isUnauthenticated,
  retryAfterSeconds,
  shouldRetry,
  signInWithGoogleCredential,
  type GoogleAccountsId,
  type GoogleIdConfiguration,
  type SignInResponse,
} from "../../clients/ts/src/index.js";

interface NodeProcess {
  stdout: { write(text: string): boolean };
  exit(code: number): never;
}
const proc = (globalThis as unknown as { process: NodeProcess }).process;

const API = "https://api.example.test";
const SESSION = "/expense.auth.v1.AuthService/GetSession";

/** What the fake fetch was asked. */
interface Sent {
  url: string;
  method: string;
  credentials: RequestCredentials | undefined;
  body: string | undefined;
}

/** A fetch that records each request and answers from `answer`. */
function fakeFetch(answer: (url: string) => Response): { fetch: typeof globalThis.fetch; sent: Sent[] } {
  const sent: Sent[] = [];
  const fetch: typeof globalThis.fetch = async (input, init) => {
    const url = input instanceof Request ? input.url : String(input);
    sent.push({
      url,
      method: init?.method ?? "GET",
      credentials: init?.credentials,
      body: init?.body instanceof Uint8Array ? new TextDecoder().decode(init.body) : undefined,
    });
    return answer(url);
  };
  return { fetch, sent };
}

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function equal(actual: unknown, expected: unknown, what: string): void {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${what}: expected ${e}, got ${a}`);
}

function refusal(code: Code, headers: Record<string, string> = {}): ConnectError {
  return new ConnectError("refused", code, headers);
}

const cases: Record<string, () => void | Promise<void>> = {
  "transport: reads are Connect GETs with the browser's cookies": async () => {
    const { fetch, sent } = fakeFetch(() => json(200, {}));
    const transport = createExpenseAuthTransport({ baseUrl: API, fetch });
    await createClient(AuthService, transport).getSession({});
    equal(sent.length, 1, "requests");
    equal(sent[0]?.method, "GET", "method");
    equal(sent[0]?.credentials, "include", "credentials");
    equal(sent[0]?.url.split("?")[0], API + SESSION, "url");
  },
  "transport: writes are POSTs with the browser's cookies": async () => {
    const { fetch, sent } = fakeFetch(() => json(200, {}));
    const transport = createExpenseAuthTransport({ baseUrl: API, fetch });
    await signInWithGoogleCredential(transport, "a-token");
    equal(
      sent.map((s) => [s.method, s.credentials, s.url, s.body]),
      [["POST", "include", `${API}/expense.auth.v1.AuthService/SignIn`, '{"googleIdToken":"a-token"}']],
      "request",
    );
  },
  "transport: useHttpGet false sends reads as POST": async () => {
    const { fetch, sent } = fakeFetch(() => json(200, {}));
    const transport = createExpenseAuthTransport({ baseUrl: API, fetch, useHttpGet: false });
    await createClient(AuthService, transport).getSession({});
    equal([sent[0]?.method, sent[0]?.credentials], ["POST", "include"], "request");
  },
  "errors: unauthenticated is recognized, nothing else is": () => {
    equal(isUnauthenticated(refusal(Code.Unauthenticated)), true, "unauthenticated");
    equal(isUnauthenticated(refusal(Code.PermissionDenied)), false, "permission_denied");
    equal(isUnauthenticated(new Error("unauthenticated")), false, "plain Error");
    equal(isUnauthenticated(undefined), false, "undefined");
  },
  "errors: resource_exhausted is recognized, nothing else is": () => {
    equal(isResourceExhausted(refusal(Code.ResourceExhausted)), true, "resource_exhausted");
    equal(isResourceExhausted(refusal(Code.Unavailable)), false, "unavailable");
    equal(isResourceExhausted("resource_exhausted"), false, "string");
  },
  "errors: Retry-After in seconds": () => {
    equal(retryAfterSeconds(refusal(Code.ResourceExhausted, { "retry-after": "42" })), 42, "resource_exhausted");
    equal(retryAfterSeconds(refusal(Code.Unavailable, { "Retry-After": " 3 " })), 3, "unavailable");
  },
  "errors: Retry-After as an HTTP date": () => {
    const now = Date.parse("Wed, 25 Nov 2026 10:00:00 GMT");
    const error = refusal(Code.ResourceExhausted, { "retry-after": "Wed, 25 Nov 2026 10:01:30 GMT" });
    equal(retryAfterSeconds(error, now), 90, "future date");
    equal(retryAfterSeconds(error, now + 600_000), 0, "past date");
  },
  "errors: no Retry-After where it does not apply": () => {
    equal(retryAfterSeconds(refusal(Code.ResourceExhausted)), undefined, "no header");
    equal(retryAfterSeconds(refusal(Code.ResourceExhausted, { "retry-after": "soon" })), undefined, "garbage");
    equal(retryAfterSeconds(refusal(Code.Unauthenticated, { "retry-after": "5" })), undefined, "other code");
    equal(retryAfterSeconds(new Error("x")), undefined, "plain Error");
  },
  "errors: retry only what a retry can fix": () => {
    const table: [unknown, boolean][] = [
      [refusal(Code.Unavailable), true],
      [refusal(Code.Unknown), true],
      [refusal(Code.DeadlineExceeded), true],
      [refusal(Code.Unavailable, { "retry-after": "30" }), false],
      [refusal(Code.Unauthenticated), false],
      [refusal(Code.InvalidArgument), false],
      [refusal(Code.PermissionDenied), false],
      [refusal(Code.NotFound), false],
      [refusal(Code.ResourceExhausted, { "retry-after": "30" }), false],
      [refusal(Code.Internal), false],
      [new TypeError("Failed to fetch"), true],
    ];
    equal(
      table.map(([error]) => shouldRetry(0, error)),
      table.map(([, retry]) => retry),
      "first failure",
    );
    equal(shouldRetry(3, refusal(Code.Unavailable)), false, "after three retries");
  },
  "sign-in: CreateSignInNonce gives the nonce and its expiry": async () => {
    const { fetch } = fakeFetch(() => json(200, { nonce: "n-1", expireTime: "2026-11-25T10:10:00Z" }));
    const nonce = await createSignInNonce(createExpenseAuthTransport({ baseUrl: API, fetch }));
    equal([nonce.nonce, nonce.expireTime?.toISOString()], ["n-1", "2026-11-25T10:10:00.000Z"], "nonce");
  },
  "sign-in: GIS gets the nonce, its credential goes to SignIn": async () => {
    const { fetch, sent } = fakeFetch((url) =>
      url.endsWith("/CreateSignInNonce")
        ? json(200, { nonce: "n-2" })
        : json(200, { user: { id: "usr_1", email: "ann@example.com" }, session: { id: "ses_1", current: true } }),
    );
    const { gis, configs } = fakeGis();
    const signedIn = new Promise<SignInResponse>((resolve, reject) => {
      void initializeGoogleSignIn(createExpenseAuthTransport({ baseUrl: API, fetch }), gis, {
        clientId: "client-1",
        onSignIn: resolve,
        onError: reject,
        gisOptions: { auto_select: true },
      }).then(() => configs[0]?.callback({ credential: "token-from-google" }));
    });
    const response = await signedIn;
    equal(
      configs.map((c) => [c.client_id, c.nonce, c.auto_select]),
      [["client-1", "n-2", true]],
      "initialize",
    );
    equal([response.user?.id, response.session?.id], ["usr_1", "ses_1"], "response");
    equal(sent[1]?.body, '{"googleIdToken":"token-from-google"}', "SignIn request");
  },
  "sign-in: a refusal reaches onError with its code and Retry-After": async () => {
    const { fetch } = fakeFetch((url) =>
      url.endsWith("/CreateSignInNonce")
        ? json(200, { nonce: "n-3" })
        : json(429, { code: "resource_exhausted", message: "too many sign-ins" }, { "retry-after": "7" }),
    );
    const { gis, configs } = fakeGis();
    const failed = new Promise<ConnectError>((resolve, reject) => {
      void initializeGoogleSignIn(createExpenseAuthTransport({ baseUrl: API, fetch }), gis, {
        clientId: "client-1",
        onSignIn: () => reject(new Error("signed in")),
        onError: resolve,
      }).then(() => configs[0]?.callback({ credential: "t" }));
    });
    const error = await failed;
    equal([isResourceExhausted(error), retryAfterSeconds(error), error.rawMessage], [true, 7, "too many sign-ins"], "error");
  },
};

function fakeGis(): { gis: GoogleAccountsId; configs: GoogleIdConfiguration[] } {
  const configs: GoogleIdConfiguration[] = [];
  const gis: GoogleAccountsId = {
    initialize: (config) => void configs.push(config),
    renderButton: () => undefined,
    prompt: () => undefined,
    disableAutoSelect: () => undefined,
  };
  return { gis, configs };
}

async function main(): Promise<void> {
  const results: Record<string, string> = {};
  for (const [name, check] of Object.entries(cases)) {
    try {
      await check();
      results[name] = "ok";
    } catch (err) {
      results[name] = err instanceof Error ? (err.stack ?? err.message) : String(err);
    }
  }
  proc.stdout.write(`${JSON.stringify(results)}\n`);
}

main().then(
  () => proc.exit(0),
  () => proc.exit(1),
);
