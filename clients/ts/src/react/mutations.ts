import type { DescMessage, DescMethodUnary, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import type { ConnectError, Transport } from "@connectrpc/connect";
import { useMutation, useTransport, type UseMutationOptions } from "@connectrpc/connect-query";
import { useQueryClient, type QueryClient, type UseMutationResult } from "@tanstack/react-query";

import {
  AuthService,
  type RevokeOtherSessionsRequestSchema,
  type RevokeOtherSessionsResponseSchema,
  type RevokeSessionRequestSchema,
  type RevokeSessionResponseSchema,
  type SignInRequestSchema,
  type SignInResponseSchema,
  type SignOutRequestSchema,
  type SignOutResponseSchema,
} from "../gen/expense/auth/v1/auth_pb.js";
import {
  UserService,
  type DeleteCurrentUserRequestSchema,
  type DeleteCurrentUserResponseSchema,
  type ExportCurrentUserDataRequestSchema,
  type ExportCurrentUserDataResponseSchema,
  type UpdateCurrentUserRequestSchema,
  type UpdateCurrentUserResponseSchema,
} from "../gen/expense/user/v1/user_pb.js";
import { SIGN_IN_NONCE_KEY, invalidate, resetApiQueries, signedIn } from "./cache.js";

// The RPCs that change state, as TanStack Query mutations through connect-query.
// Each one also updates what the read queries have cached, before the caller's
// own callbacks run: after RevokeSession the session list is refetched, after
// SignOut nothing of the user stays in the cache, and so on.

/** A mutation of one RPC: `mutate(input)` sends it. */
export type RpcMutation<I extends DescMessage, O extends DescMessage> = UseMutationResult<
  MessageShape<O>,
  ConnectError,
  MessageInitShape<I>
>;

interface Effects<O extends DescMessage> {
  onSuccess?: (queryClient: QueryClient, transport: Transport, output: MessageShape<O>) => Promise<void>;
  onError?: (queryClient: QueryClient) => Promise<void>;
}

function useRpcMutation<I extends DescMessage, O extends DescMessage>(
  method: DescMethodUnary<I, O>,
  effects: Effects<O>,
  options: UseMutationOptions<I, O> = {},
): RpcMutation<I, O> {
  const queryClient = useQueryClient();
  const contextTransport = useTransport();
  const transport = options.transport ?? contextTransport;
  return useMutation(method, {
    ...options,
    transport,
    onSuccess: async (...args) => {
      await effects.onSuccess?.(queryClient, transport, args[0]);
      return options.onSuccess?.(...args);
    },
    onError: async (...args) => {
      await effects.onError?.(queryClient);
      return options.onError?.(...args);
    },
  });
}

/**
 * SignIn with `{ googleIdToken: credential }`, the credential from Google
 * Identity Services. On success the session query holds the new user and
 * session and the other queries are refetched. The nonce of {@link useSignInNonce}
 * is renewed: at once after a failure, on the next sign-in form after a success.
 */
export function useSignIn(options?: UseMutationOptions<typeof SignInRequestSchema, typeof SignInResponseSchema>) {
  return useRpcMutation(
    AuthService.method.signIn,
    {
      // The nonce is spent: a new one is fetched when a sign-in form shows again.
      onSuccess: async (queryClient, transport, response) => {
        await queryClient.invalidateQueries({ queryKey: SIGN_IN_NONCE_KEY, refetchType: "none" });
        await signedIn(queryClient, transport, response);
      },
      // It may be spent, expired or refused: the form on screen gets a fresh one.
      onError: (queryClient) => queryClient.invalidateQueries({ queryKey: SIGN_IN_NONCE_KEY }),
    },
    options,
  );
}

/** SignOut: ends this browser's session; every cached answer of the API is dropped. */
export function useSignOut(options?: UseMutationOptions<typeof SignOutRequestSchema, typeof SignOutResponseSchema>) {
  return useRpcMutation(AuthService.method.signOut, { onSuccess: resetApiQueries }, options);
}

/** RevokeSession `{ sessionId }`: signs another browser out; the session list reloads. */
export function useRevokeSession(
  options?: UseMutationOptions<typeof RevokeSessionRequestSchema, typeof RevokeSessionResponseSchema>,
) {
  return useRpcMutation(AuthService.method.revokeSession, { onSuccess: sessionsChanged }, options);
}

/** RevokeOtherSessions: "sign out everywhere else"; the session list reloads. */
export function useRevokeOtherSessions(
  options?: UseMutationOptions<typeof RevokeOtherSessionsRequestSchema, typeof RevokeOtherSessionsResponseSchema>,
) {
  return useRpcMutation(AuthService.method.revokeOtherSessions, { onSuccess: sessionsChanged }, options);
}

/** UpdateCurrentUser `{ user, updateMask }`: the profile queries reload. */
export function useUpdateCurrentUser(
  options?: UseMutationOptions<typeof UpdateCurrentUserRequestSchema, typeof UpdateCurrentUserResponseSchema>,
) {
  return useRpcMutation(
    UserService.method.updateCurrentUser,
    {
      onSuccess: (queryClient) =>
        invalidate(
          queryClient,
          UserService.method.getCurrentUser,
          AuthService.method.getSession,
          UserService.method.listSecurityEvents,
        ),
    },
    options,
  );
}

/**
 * DeleteCurrentUser `{ googleIdToken }` (a fresh Google sign-in proves it is the
 * user): the account and its sessions are gone, so is every cached answer.
 */
export function useDeleteCurrentUser(
  options?: UseMutationOptions<typeof DeleteCurrentUserRequestSchema, typeof DeleteCurrentUserResponseSchema>,
) {
  return useRpcMutation(UserService.method.deleteCurrentUser, { onSuccess: resetApiQueries }, options);
}

/** ExportCurrentUserData: everything stored about the user (the export is itself a security event). */
export function useExportCurrentUserData(
  options?: UseMutationOptions<typeof ExportCurrentUserDataRequestSchema, typeof ExportCurrentUserDataResponseSchema>,
) {
  return useRpcMutation(
    UserService.method.exportCurrentUserData,
    { onSuccess: (queryClient) => invalidate(queryClient, UserService.method.listSecurityEvents) },
    options,
  );
}

function sessionsChanged(queryClient: QueryClient): Promise<void> {
  return invalidate(queryClient, AuthService.method.listSessions, UserService.method.listSecurityEvents);
}
