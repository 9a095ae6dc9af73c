// React hooks over TanStack Query and connect-query. The app provides both
// contexts: <TransportProvider transport={createExpenseAuthTransport(...)}> and
// <QueryClientProvider client={queryClient}>.

export {
  useGetCurrentUser,
  useGetSession,
  useListSecurityEvents,
  useListSessions,
  useSession,
  type SessionState,
} from "./react/queries.js";
export {
  useDeleteCurrentUser,
  useExportCurrentUserData,
  useRevokeOtherSessions,
  useRevokeSession,
  useSignIn,
  useSignOut,
  useUpdateCurrentUser,
  type RpcMutation,
} from "./react/mutations.js";
export {
  useGoogleSignIn,
  useSignInNonce,
  type GoogleSignIn,
  type UseGoogleSignInOptions,
} from "./react/sign-in.js";
export { SIGN_IN_NONCE_KEY } from "./react/cache.js";
export { createExpenseAuthQueryClient } from "./react/client.js";
