import type { MessageInitShape } from "@bufbuild/protobuf";
import type { ConnectError } from "@connectrpc/connect";
import { useQuery, type UseQueryOptions } from "@connectrpc/connect-query";
import type { UseQueryResult } from "@tanstack/react-query";

import { isUnauthenticated, shouldRetry } from "../errors.js";
import {
  AuthService,
  type GetSessionResponse,
  type GetSessionResponseSchema,
  type ListSessionsRequestSchema,
  type ListSessionsResponse,
  type ListSessionsResponseSchema,
  type Session,
} from "../gen/expense/auth/v1/auth_pb.js";
import {
  UserService,
  type GetCurrentUserResponse,
  type GetCurrentUserResponseSchema,
  type ListSecurityEventsRequestSchema,
  type ListSecurityEventsResponse,
  type ListSecurityEventsResponseSchema,
  type User,
} from "../gen/expense/user/v1/user_pb.js";

// The read RPCs (NO_SIDE_EFFECTS in the contract) as TanStack Query queries,
// through connect-query, so their keys are connect-query's and the usual
// connect-query tools (createConnectQueryKey, callUnaryMethod) apply to them.
// Options are TanStack's, plus `transport`; `retry` defaults to shouldRetry.

function withDefaults<T extends { retry?: unknown }>(options: T | undefined): T {
  return { retry: shouldRetry, ...options } as T;
}

/** GetSession: the caller's session and user; `unauthenticated` when signed out. */
export function useGetSession<S = GetSessionResponse>(
  options?: UseQueryOptions<typeof GetSessionResponseSchema, S>,
): UseQueryResult<S, ConnectError> {
  return useQuery(AuthService.method.getSession, {}, withDefaults(options));
}

/** GetCurrentUser: the caller's profile. */
export function useGetCurrentUser<S = GetCurrentUserResponse>(
  options?: UseQueryOptions<typeof GetCurrentUserResponseSchema, S>,
): UseQueryResult<S, ConnectError> {
  return useQuery(UserService.method.getCurrentUser, {}, withDefaults(options));
}

/** ListSessions: one page of the caller's live sessions, newest first. */
export function useListSessions<S = ListSessionsResponse>(
  input: MessageInitShape<typeof ListSessionsRequestSchema> = {},
  options?: UseQueryOptions<typeof ListSessionsResponseSchema, S>,
): UseQueryResult<S, ConnectError> {
  return useQuery(AuthService.method.listSessions, input, withDefaults(options));
}

/** ListSecurityEvents: one page of the caller's security history, newest first. */
export function useListSecurityEvents<S = ListSecurityEventsResponse>(
  input: MessageInitShape<typeof ListSecurityEventsRequestSchema> = {},
  options?: UseQueryOptions<typeof ListSecurityEventsResponseSchema, S>,
): UseQueryResult<S, ConnectError> {
  return useQuery(UserService.method.listSecurityEvents, input, withDefaults(options));
}

/** What {@link useSession} reports. */
export type SessionState =
  | { status: "loading" }
  | { status: "signed-in"; user: User; session: Session }
  | { status: "signed-out" }
  | { status: "error"; error: ConnectError };

/**
 * The signed-in state, from GetSession: `signed-out` when the server answers
 * `unauthenticated` (no cookie, signed out, expired, or revoked elsewhere; also
 * when a refetch finds that out after the session had loaded), `error` for any
 * other failure such as the network. The query itself is in `query`.
 */
export function useSession(
  options?: Omit<UseQueryOptions<typeof GetSessionResponseSchema>, "select">,
): SessionState & { query: UseQueryResult<GetSessionResponse, ConnectError> } {
  const query = useGetSession(options);
  return { ...sessionState(query), query };
}

function sessionState(query: UseQueryResult<GetSessionResponse, ConnectError>): SessionState {
  if (query.error !== null) {
    return isUnauthenticated(query.error) ? { status: "signed-out" } : { status: "error", error: query.error };
  }
  if (query.data === undefined) return { status: "loading" };
  const { user, session } = query.data;
  if (user === undefined || session === undefined) {
    // The contract always fills both; treat a reply without them as signed out.
    return { status: "signed-out" };
  }
  return { status: "signed-in", user, session };
}
