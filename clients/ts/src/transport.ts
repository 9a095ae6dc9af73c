import type { Interceptor, Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";

/** Options of {@link createExpenseAuthTransport}. */
export interface ExpenseAuthTransportOptions {
  /**
   * Where the API is served, e.g. `https://auth.example.com` (an origin, plus a
   * path prefix if a proxy adds one). The page's origin must be in the server's
   * `CORS_ALLOWED_ORIGIN`.
   */
  baseUrl: string;
  /**
   * Send the read-only RPCs (GetSession, ListSessions, GetCurrentUser,
   * ListSecurityEvents) as Connect GET requests. Default `true`: a GET carries no
   * custom header, so the browser needs no CORS preflight for it. The server
   * answers every call with `Cache-Control: no-store`, so nothing is cached.
   */
  useHttpGet?: boolean;
  /** Protobuf binary instead of JSON on the wire. Default `false` (readable in DevTools). */
  useBinaryFormat?: boolean;
  /** Connect interceptors, e.g. for logging or tracing. */
  interceptors?: Interceptor[];
  /** The `fetch` to use; default `globalThis.fetch`. Credentials are added either way. */
  fetch?: typeof globalThis.fetch;
}

/**
 * The transport for a browser app: the Connect protocol, with the browser's
 * cookies sent on every call (`credentials: "include"`), since the session
 * cookie is HttpOnly and belongs to the API's origin, not to the page's.
 *
 * No default timeout is set on purpose: a `Connect-Timeout-Ms` header would make
 * every Connect GET need a CORS preflight. Pass `signal` or `timeoutMs` per call
 * where a deadline matters.
 */
export function createExpenseAuthTransport(options: ExpenseAuthTransportOptions): Transport {
  const baseFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  return createConnectTransport({
    baseUrl: options.baseUrl,
    useHttpGet: options.useHttpGet ?? true,
    useBinaryFormat: options.useBinaryFormat ?? false,
    interceptors: options.interceptors ?? [],
    fetch: (input, init) => baseFetch(input, { ...init, credentials: "include" }),
  });
}
