import { create } from "@bufbuild/protobuf";
import type { Transport } from "@connectrpc/connect";
import { createConnectQueryKey } from "@connectrpc/connect-query";
import type { QueryClient, QueryKey } from "@tanstack/react-query";

import {
  AuthService,
  GetSessionResponseSchema,
  type SignInResponse,
} from "../gen/expense/auth/v1/auth_pb.js";
import { UserService } from "../gen/expense/user/v1/user_pb.js";

// What each mutation changes in the cached answers of the read RPCs. Every
// query of this package is keyed by connect-query: ["connect-query",
// {serviceName, methodName, transport, input, cardinality}].

/**
 * The key of the sign-in nonce query. CreateSignInNonce is not a read RPC (it
 * sets a cookie), so it is not a connect-query query; one API per app is assumed.
 */
export const SIGN_IN_NONCE_KEY = ["@expense/auth-client", "sign-in-nonce"] as const;

const SERVICES: ReadonlySet<string> = new Set([AuthService.typeName, UserService.typeName]);

function methodOf(queryKey: QueryKey): { serviceName?: unknown; methodName?: unknown } | undefined {
  const [kind, props] = queryKey;
  return kind === "connect-query" && typeof props === "object" && props !== null ? props : undefined;
}

/** Whether a query belongs to this API, optionally to one RPC of it. */
function isApiQuery(queryKey: QueryKey, method?: { parent: { typeName: string }; name: string }): boolean {
  const props = methodOf(queryKey);
  if (props === undefined || typeof props.serviceName !== "string" || !SERVICES.has(props.serviceName)) {
    return false;
  }
  return method === undefined || (props.serviceName === method.parent.typeName && props.methodName === method.name);
}

/** The key of GetSession's query, as useQuery builds it. */
function getSessionKey(transport: Transport) {
  return createConnectQueryKey({
    schema: AuthService.method.getSession,
    input: {},
    transport,
    cardinality: "finite",
  });
}

/**
 * The user behind the cookie changed (sign-out, account deletion): forget every
 * cached answer of the API, so nothing of the previous user stays on screen,
 * and refetch what is shown (GetSession then reports the signed-out state).
 */
export async function resetApiQueries(queryClient: QueryClient): Promise<void> {
  await queryClient.resetQueries({ predicate: (query) => isApiQuery(query.queryKey) });
}

/** A new session: GetSession from the SignIn response, everything else refetched. */
export async function signedIn(queryClient: QueryClient, transport: Transport, response: SignInResponse) {
  queryClient.setQueryData(
    getSessionKey(transport),
    create(GetSessionResponseSchema, { user: response.user, session: response.session }),
  );
  await queryClient.resetQueries({
    predicate: (query) => isApiQuery(query.queryKey) && !isApiQuery(query.queryKey, AuthService.method.getSession),
  });
}

/** Refetch the answers of some RPCs (they are marked stale; those on screen reload). */
export async function invalidate(
  queryClient: QueryClient,
  ...methods: { parent: { typeName: string }; name: string }[]
): Promise<void> {
  await queryClient.invalidateQueries({
    predicate: (query) => methods.some((method) => isApiQuery(query.queryKey, method)),
  });
}
