// The TypeScript interop client: @connectrpc/connect + @connectrpc/connect-node
// against the real server, over several protocols.
//
// Usage: tsx client.ts BASE_URL PROTOCOL...
//   PROTOCOL is one of connect-json-h1 (Connect, JSON, HTTP/1.1),
//   grpc-h2 (gRPC, HTTP/2) and grpc-web-h1 (gRPC-Web, HTTP/1.1).
// For each PROTOCOL the environment holds two Google ID tokens of one user:
//   TOKEN_<PROTOCOL>_1 and TOKEN_<PROTOCOL>_2 (PROTOCOL upper-cased, "-" -> "_").
// Tokens come through the environment, not argv, so they never show in `ps`.
//
// It prints one JSON object, keyed by protocol, describing what each step
// returned; the pytest side (test_typescript.py) asserts on it. Cookie values
// are never printed, only their names and attributes.

import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { timestampMs } from "@bufbuild/protobuf/wkt";

import { AuthService } from "../../../gen/ts/expense/auth/v1/auth_pb.js";
import { UserService } from "../../../gen/ts/expense/user/v1/user_pb.js";

type Protocol = "connect-json-h1" | "grpc-h2" | "grpc-web-h1";

// The few parts of Node's `process` used here, typed locally: the project has no
// @types/node, and this keeps `tsc --noEmit` clean with or without it.
interface NodeProcess {
  argv: string[];
  env: Record<string, string | undefined>;
  stdout: { write(text: string): boolean };
  stderr: { write(text: string): boolean };
  exit(code: number): never;
}
const proc = (globalThis as unknown as { process: NodeProcess }).process;

/** A one-cookie jar, as a browser keeps it, fed by an interceptor. */
class Jar {
  cookie: string | undefined;
  setCookies: string[] = [];

  readonly interceptor: Interceptor = (next) => async (req) => {
    if (this.cookie !== undefined) {
      req.header.set("cookie", this.cookie);
    }
    try {
      const res = await next(req);
      this.absorb(res.header);
      return res;
    } catch (err) {
      // An error response can carry a Set-Cookie too (an expired cookie).
      this.absorb(ConnectError.from(err).metadata);
      throw err;
    }
  };

  private absorb(headers: Headers): void {
    this.setCookies = headers.getSetCookie();
    for (const setCookie of this.setCookies) {
      const pair = setCookie.split(";", 1)[0];
      const eq = pair.indexOf("=");
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      this.cookie = value !== "" && !/max-age=0(;|$)/i.test(setCookie) ? `${name}=${value}` : undefined;
    }
  }
}

/** What a Set-Cookie said, without its value. */
function describeSetCookie(setCookie: string): { name: string; valueLength: number; attributes: string[] } {
  const [pair, ...attributes] = setCookie.split(";").map((part) => part.trim());
  const eq = pair.indexOf("=");
  return { name: pair.slice(0, eq), valueLength: pair.length - eq - 1, attributes };
}

function transportFor(protocol: Protocol, baseUrl: string, jar: Jar): Transport {
  const interceptors = [jar.interceptor];
  switch (protocol) {
    case "connect-json-h1":
      return createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: false, interceptors });
    case "grpc-h2":
      return createGrpcTransport({ baseUrl, interceptors });
    case "grpc-web-h1":
      return createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors });
  }
}

/** The error of a call that must fail, as {code, message}; "no error" if it succeeded. */
async function failure(call: () => Promise<unknown>): Promise<{ code: string; message: string }> {
  try {
    await call();
  } catch (err) {
    const error = ConnectError.from(err);
    return { code: Code[error.code], message: error.rawMessage };
  }
  return { code: "no error", message: "" };
}

function tokens(protocol: Protocol): [string, string] {
  const prefix = `TOKEN_${protocol.toUpperCase().replaceAll("-", "_")}`;
  const first = proc.env[`${prefix}_1`];
  const second = proc.env[`${prefix}_2`];
  if (!first || !second) {
    throw new Error(`${prefix}_1 and ${prefix}_2 must be set`);
  }
  return [first, second];
}

async function run(protocol: Protocol, baseUrl: string): Promise<Record<string, unknown>> {
  const [firstToken, secondToken] = tokens(protocol);
  const jar = new Jar();
  const other = new Jar();
  const auth = createClient(AuthService, transportFor(protocol, baseUrl, jar));
  const users = createClient(UserService, transportFor(protocol, baseUrl, jar));
  const otherAuth = createClient(AuthService, transportFor(protocol, baseUrl, other));
  const anonymous = createClient(AuthService, transportFor(protocol, baseUrl, new Jar()));

  // SignIn, capturing the cookie from the response headers.
  const signedIn = await auth.signIn({ googleIdToken: firstToken });
  const signInSetCookies = jar.setCookies.map(describeSetCookie);
  const hasCookie = jar.cookie !== undefined;

  // A second session of the same user, as from another device.
  const secondSignIn = await otherAuth.signIn({ googleIdToken: secondToken });

  const got = await auth.getSession({});
  const me = await users.getCurrentUser({});
  const listed = await auth.listSessions({});
  const updated = await users.updateCurrentUser({
    user: { displayName: `TS ${protocol}` },
    updateMask: { paths: ["display_name"] },
  });
  const badUpdate = await failure(() =>
    users.updateCurrentUser({ user: { email: "x@example.com" }, updateMask: { paths: ["email"] } }),
  );

  // Revoke the other device's session; its very next call is refused.
  await auth.revokeSession({ sessionId: secondSignIn.session?.id ?? "" });
  const revokedCall = await failure(() => otherAuth.getSession({}));
  // The refusal also expires the dead cookie (Set-Cookie on an error response).
  const revokedCookieCleared = other.cookie === undefined;
  const revokeAgain = await failure(() => auth.revokeSession({ sessionId: secondSignIn.session?.id ?? "" }));
  const listedAfterRevoke = await auth.listSessions({});

  // SignOut expires the cookie; a client that keeps the old one is refused.
  const cookieBeforeSignOut = jar.cookie;
  await auth.signOut({});
  const signOutSetCookies = jar.setCookies.map(describeSetCookie);
  const clearedByServer = jar.cookie === undefined;
  jar.cookie = cookieBeforeSignOut;
  const afterSignOut = await failure(() => auth.getSession({}));
  const withoutCookie = await failure(() => anonymous.getSession({}));

  const session = got.session;
  return {
    signIn: {
      userId: signedIn.user?.id,
      email: signedIn.user?.email,
      sessionId: signedIn.session?.id,
      current: signedIn.session?.current,
      setCookies: signInSetCookies,
      hasCookie,
    },
    secondSignIn: { userId: secondSignIn.user?.id, sessionId: secondSignIn.session?.id },
    getSession: {
      userId: got.user?.id,
      email: got.user?.email,
      sessionId: session?.id,
      current: session?.current,
      userAgent: session?.userAgent,
      expiresAfterCreation:
        session?.createTime !== undefined &&
        session.expireTime !== undefined &&
        timestampMs(session.expireTime) > timestampMs(session.createTime),
    },
    getCurrentUser: { userId: me.user?.id },
    listSessions: {
      ids: listed.sessions.map((s) => s.id),
      currentIds: listed.sessions.filter((s) => s.current).map((s) => s.id),
    },
    updateCurrentUser: { displayName: updated.user?.displayName },
    badUpdate,
    revokedCall,
    revokedCookieCleared,
    revokeAgain,
    listAfterRevoke: { ids: listedAfterRevoke.sessions.map((s) => s.id) },
    signOut: { setCookies: signOutSetCookies, clearedByServer },
    afterSignOut,
    withoutCookie,
  };
}

async function main(): Promise<void> {
  const [baseUrl, ...protocols] = proc.argv.slice(2);
  const known: Protocol[] = ["connect-json-h1", "grpc-h2", "grpc-web-h1"];
  if (!baseUrl || protocols.length === 0) {
    throw new Error(`usage: client.ts BASE_URL (${known.join("|")})...`);
  }
  const summary: Record<string, unknown> = {};
  for (const protocol of protocols) {
    if (!known.includes(protocol as Protocol)) {
      throw new Error(`unknown protocol ${protocol}; known: ${known.join(", ")}`);
    }
    summary[protocol] = await run(protocol as Protocol, baseUrl);
  }
  proc.stdout.write(`${JSON.stringify(summary)}\n`);
}

main().then(
  // HTTP/2 sessions would keep the process alive until their idle timeout.
  () => proc.exit(0),
  (err: unknown) => {
    proc.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    proc.exit(1);
  },
);
