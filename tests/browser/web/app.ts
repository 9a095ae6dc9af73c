// The browser test page: the generated clients over @connectrpc/connect-web,
// with the browser's own cookie handling (credentials: "include").
//
// index.html loads this module (bundled by esbuild at test time) from a page
// origin; `?api=<base URL>` names the API. It exposes `window.expenseAuth`, whose
// steps the Playwright driver (../drive.ts) calls with page.evaluate. Every step
// resolves to an Outcome, never rejects, so the driver sees exactly what the
// page's code could see: a value, or the error a Connect client reports (a CORS
// refusal shows up as a network error that hides the response).

import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampMs } from "@bufbuild/protobuf/wkt";

import { AuthService, type Session } from "../../../gen/ts/expense/auth/v1/auth_pb.js";
import { UserService } from "../../../gen/ts/expense/user/v1/user_pb.js";

/**
 * How a step reaches the API: Connect POST, Connect GET (only for side-effect
 * free procedures; needs no CORS preflight) or gRPC-Web.
 */
export type Protocol = "connect" | "connect-get" | "grpc-web";

export interface Failure {
  /** The Connect code's name, e.g. "Unauthenticated"; "Unknown" for network errors. */
  code: string;
  message: string;
  /** The underlying error (e.g. "TypeError: Failed to fetch"), when there is one. */
  cause?: string;
}

export type Outcome<T> = { ok: true; value: T } | { ok: false; error: Failure };

export interface SessionView {
  id: string;
  current: boolean;
  userAgent: string;
  expiresAfterCreation: boolean;
}

export interface UserView {
  id: string;
  email: string;
}

export interface SignedIn {
  user?: UserView;
  session?: SessionView;
}

/** What a request made with `mode: "no-cors"` lets the page know: next to nothing. */
export interface OpaqueResult {
  type: string;
  status: number;
  bodyLength: number;
}

/** The steps the driver can run in the page. */
export interface ExpenseAuthPage {
  origin: string;
  apiBase: string;
  signIn(token: string, protocol?: Protocol): Promise<Outcome<SignedIn>>;
  getSession(protocol?: Protocol): Promise<Outcome<SignedIn>>;
  getCurrentUser(protocol?: Protocol): Promise<Outcome<UserView | undefined>>;
  listSessions(protocol?: Protocol): Promise<Outcome<SessionView[]>>;
  signOut(protocol?: Protocol): Promise<Outcome<null>>;
  revokeOtherSessions(protocol?: Protocol): Promise<Outcome<null>>;
  /** A "simple" credentialed POST (text/plain, no preflight) to a procedure path. */
  noCorsPost(procedurePath: string): Promise<Outcome<OpaqueResult>>;
  documentCookie(): string;
}

declare global {
  interface Window {
    expenseAuth: ExpenseAuthPage;
  }
}

const CALL_TIMEOUT_MS = 5000;

// The browser keeps the session cookie; every request must carry it, also to
// another origin of the same site, hence credentials: "include".
const credentialedFetch: typeof fetch = (input, init) => fetch(input, { ...init, credentials: "include" });

function clientsFor(baseUrl: string, protocol: Protocol) {
  const transport =
    protocol === "grpc-web"
      ? createGrpcWebTransport({ baseUrl, fetch: credentialedFetch })
      : createConnectTransport({ baseUrl, fetch: credentialedFetch, useHttpGet: protocol === "connect-get" });
  return { auth: createClient(AuthService, transport), users: createClient(UserService, transport) };
}

function describe(err: unknown): Failure {
  const error = ConnectError.from(err);
  const failure: Failure = { code: Code[error.code], message: error.rawMessage };
  const cause = error.cause ?? (err instanceof ConnectError ? undefined : err);
  if (cause instanceof Error) {
    failure.cause = `${cause.name}: ${cause.message}`;
  } else if (cause !== undefined) {
    failure.cause = String(cause);
  }
  return failure;
}

async function outcome<T>(step: () => Promise<T>): Promise<Outcome<T>> {
  try {
    return { ok: true, value: await step() };
  } catch (err) {
    return { ok: false, error: describe(err) };
  }
}

function sessionView(session: Session): SessionView {
  return {
    id: session.id,
    current: session.current,
    userAgent: session.userAgent,
    expiresAfterCreation:
      session.createTime !== undefined &&
      session.expireTime !== undefined &&
      timestampMs(session.expireTime) > timestampMs(session.createTime),
  };
}

function userView(user: { id: string; email: string } | undefined): UserView | undefined {
  return user === undefined ? undefined : { id: user.id, email: user.email };
}

function signedIn(response: { user?: { id: string; email: string }; session?: Session }): SignedIn {
  return {
    user: userView(response.user),
    session: response.session === undefined ? undefined : sessionView(response.session),
  };
}

function createPage(apiBase: string): ExpenseAuthPage {
  const clients: Partial<Record<Protocol, { auth: Client<typeof AuthService>; users: Client<typeof UserService> }>> =
    {};
  const of = (protocol: Protocol = "connect") => (clients[protocol] ??= clientsFor(apiBase, protocol));
  // A deadline by AbortSignal, not `timeoutMs`: that would add a Connect-Timeout-Ms
  // header, and any such header makes even a Connect GET need a CORS preflight.
  const options = () => ({ signal: AbortSignal.timeout(CALL_TIMEOUT_MS) });

  return {
    origin: location.origin,
    apiBase,
    signIn: (token, protocol) =>
      outcome(async () => signedIn(await of(protocol).auth.signIn({ googleIdToken: token }, options()))),
    getSession: (protocol) => outcome(async () => signedIn(await of(protocol).auth.getSession({}, options()))),
    getCurrentUser: (protocol) =>
      outcome(async () => userView((await of(protocol).users.getCurrentUser({}, options())).user)),
    listSessions: (protocol) =>
      outcome(async () => (await of(protocol).auth.listSessions({}, options())).sessions.map(sessionView)),
    signOut: (protocol) =>
      outcome(async () => {
        await of(protocol).auth.signOut({}, options());
        return null;
      }),
    revokeOtherSessions: (protocol) =>
      outcome(async () => {
        await of(protocol).auth.revokeOtherSessions({}, options());
        return null;
      }),
    noCorsPost: (procedurePath) =>
      outcome(async () => {
        // What any page can do without CORS: the browser sends it (with the
        // cookie if SameSite allows) and hands back an opaque response.
        const response = await fetch(new URL(procedurePath, apiBase), {
          method: "POST",
          mode: "no-cors",
          credentials: "include",
          body: "{}",
          signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
        });
        const body = await response.arrayBuffer();
        return { type: response.type, status: response.status, bodyLength: body.byteLength };
      }),
    documentCookie: () => document.cookie,
  };
}

const apiBase = new URL(location.href).searchParams.get("api");
const status = document.getElementById("status");
if (apiBase === null) {
  if (status !== null) status.textContent = "missing ?api=<base URL of the API>";
} else {
  window.expenseAuth = createPage(apiBase);
  if (status !== null) status.textContent = "ready";
}
