import { Code, ConnectError } from "@connectrpc/connect";

/** A ConnectError with a known code, as the type guards below narrow it. */
export type ConnectErrorWithCode<C extends Code> = ConnectError & { readonly code: C };

/**
 * True when the call was refused for want of a valid session: never signed in,
 * signed out, expired, or revoked (possibly from another browser). The app
 * should show its signed-out state; retrying will not help.
 */
export function isUnauthenticated(error: unknown): error is ConnectErrorWithCode<Code.Unauthenticated> {
  return error instanceof ConnectError && error.code === Code.Unauthenticated;
}

/**
 * True when a rate limit refused the call (`resource_exhausted`): too many
 * sign-ins, or too many calls from this session or network. The server says
 * when to try again: see {@link retryAfterSeconds}.
 */
export function isResourceExhausted(error: unknown): error is ConnectErrorWithCode<Code.ResourceExhausted> {
  return error instanceof ConnectError && error.code === Code.ResourceExhausted;
}

/**
 * How many seconds the server asked the caller to wait before retrying, from
 * the `Retry-After` header of a `resource_exhausted` or `unavailable` error
 * (the server exposes that header to browsers through CORS). `undefined` for
 * any other error, or when the header is missing or unreadable.
 *
 * @param now - The current time in ms since the epoch, for a `Retry-After` given
 *   as an HTTP date (the server sends seconds; proxies may send dates).
 */
export function retryAfterSeconds(error: unknown, now: number = Date.now()): number | undefined {
  if (!(error instanceof ConnectError)) return undefined;
  if (error.code !== Code.ResourceExhausted && error.code !== Code.Unavailable) return undefined;
  const value = error.metadata.get("retry-after")?.trim();
  if (value === undefined || value === "") return undefined;
  if (/^\d+$/.test(value)) return Number.parseInt(value, 10);
  const date = Date.parse(value);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, Math.ceil((date - now) / 1000));
}

/**
 * Whether a failed call is worth retrying at once: not when the answer would be
 * the same (bad input, no session, not allowed, not found) nor when the server
 * asked the caller to wait (`resource_exhausted`). Shaped for TanStack Query's
 * `retry` option: at most three retries.
 */
export function shouldRetry(failureCount: number, error: unknown): boolean {
  if (failureCount >= 3) return false;
  if (!(error instanceof ConnectError)) return true;
  switch (error.code) {
    case Code.Unknown: // includes network errors ("Failed to fetch")
    case Code.Unavailable:
    case Code.DeadlineExceeded:
    case Code.Aborted:
      return retryAfterSeconds(error) === undefined;
    default:
      return false;
  }
}
