import { MutationCache, QueryCache, QueryClient, type QueryClientConfig, type QueryKey } from "@tanstack/react-query";

import { isUnauthenticated, shouldRetry } from "../errors.js";
import { AuthService } from "../gen/expense/auth/v1/auth_pb.js";

function isGetSession(queryKey: QueryKey): boolean {
  const [kind, props] = queryKey;
  if (kind !== "connect-query" || typeof props !== "object" || props === null) return false;
  const { serviceName, methodName } = props as { serviceName?: unknown; methodName?: unknown };
  return serviceName === AuthService.typeName && methodName === AuthService.method.getSession.name;
}

/**
 * A QueryClient for an app that uses this API: failed calls are retried only
 * when that can help ({@link shouldRetry}), and when any call answers
 * `unauthenticated` (the session was revoked from another browser, or has
 * expired) GetSession is refetched, so that `useSession()` turns `signed-out`
 * everywhere at once. `config` is passed on; its own defaults win.
 */
export function createExpenseAuthQueryClient(config: QueryClientConfig = {}): QueryClient {
  const sessionLost = (error: unknown) => {
    if (isUnauthenticated(error)) {
      void client.invalidateQueries({ predicate: (query) => isGetSession(query.queryKey) });
    }
  };
  const queryCache =
    config.queryCache ??
    new QueryCache({
      onError: (error, query) => {
        if (!isGetSession(query.queryKey)) sessionLost(error);
      },
    });
  const mutationCache = config.mutationCache ?? new MutationCache({ onError: sessionLost });
  const client: QueryClient = new QueryClient({
    ...config,
    queryCache,
    mutationCache,
    defaultOptions: {
      ...config.defaultOptions,
      queries: { retry: shouldRetry, ...config.defaultOptions?.queries },
      mutations: { retry: false, ...config.defaultOptions?.mutations },
    },
  });
  return client;
}
