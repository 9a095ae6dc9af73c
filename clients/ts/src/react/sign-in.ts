import type { ConnectError, Transport } from "@connectrpc/connect";
import { useTransport, type UseMutationOptions } from "@connectrpc/connect-query";
import { useQuery, type UseQueryResult } from "@tanstack/react-query";
import { useEffect, useRef, useState } from "react";

import { shouldRetry } from "../errors.js";
import type { SignInRequestSchema, SignInResponseSchema } from "../gen/expense/auth/v1/auth_pb.js";
import type { GoogleAccountsId, GoogleIdConfiguration } from "../google.js";
import { createSignInNonce, type SignInNonce } from "../sign-in.js";
import { SIGN_IN_NONCE_KEY } from "./cache.js";
import { useSignIn, type RpcMutation } from "./mutations.js";

/** A nonce is replaced this long before it expires, so a sign-in in progress can finish. */
const NONCE_MARGIN_MS = 60_000;

function msUntilRenewal(nonce: SignInNonce | undefined): number {
  if (nonce?.expireTime === undefined) return Number.POSITIVE_INFINITY;
  return Math.max(0, nonce.expireTime.getTime() - Date.now() - NONCE_MARGIN_MS);
}

/**
 * The nonce of the sign-in to come, from CreateSignInNonce, shared by every
 * component that asks (one nonce per browser is valid at a time). It is renewed
 * before it expires and after each sign-in attempt (useSignIn sees to that).
 */
export function useSignInNonce(options?: {
  transport?: Transport;
  enabled?: boolean;
}): UseQueryResult<SignInNonce, ConnectError> {
  const contextTransport = useTransport();
  const transport = options?.transport ?? contextTransport;
  return useQuery<SignInNonce, ConnectError>({
    queryKey: SIGN_IN_NONCE_KEY,
    queryFn: ({ signal }) => createSignInNonce(transport, { signal }),
    enabled: options?.enabled ?? true,
    staleTime: (query) => msUntilRenewal(query.state.data),
    refetchInterval: (query) => {
      const ms = msUntilRenewal(query.state.data);
      return Number.isFinite(ms) ? Math.max(ms, 1000) : false;
    },
    refetchOnReconnect: false,
    retry: shouldRetry,
  });
}

/** Options of {@link useGoogleSignIn}. */
export interface UseGoogleSignInOptions {
  /** The OAuth client id of the frontend (one of the server's `GOOGLE_CLIENT_ID`). */
  clientId: string;
  /** More options for `google.accounts.id.initialize` (not `client_id`, `callback`, `nonce`). */
  gisOptions?: Omit<Partial<GoogleIdConfiguration>, "client_id" | "callback" | "nonce">;
  /** Options of the SignIn mutation (e.g. onSuccess, onError). */
  mutation?: UseMutationOptions<typeof SignInRequestSchema, typeof SignInResponseSchema>;
  transport?: Transport;
}

/** What {@link useGoogleSignIn} returns. */
export interface GoogleSignIn {
  /** The CreateSignInNonce query: `nonce.data.nonce` is what GIS gets, `nonce.error` why not. */
  nonce: UseQueryResult<SignInNonce, ConnectError>;
  /** True once `gis.initialize` has run with the current nonce: render the button or prompt. */
  ready: boolean;
  /** The SignIn mutation that GIS's callback triggers: its status and error. */
  signIn: RpcMutation<typeof SignInRequestSchema, typeof SignInResponseSchema>;
}

/**
 * The CreateSignInNonce → Google Identity Services → SignIn flow. Pass GIS as
 * loaded by the app (`window.google.accounts.id`, or `undefined` while it
 * loads): the hook initializes it with the current nonce and a callback that
 * sends the credential to SignIn, again whenever the nonce is renewed. Render
 * the button (`gis.renderButton`) once `ready` is true.
 */
export function useGoogleSignIn(gis: GoogleAccountsId | undefined, options: UseGoogleSignInOptions): GoogleSignIn {
  const nonce = useSignInNonce({ transport: options.transport, enabled: gis !== undefined });
  const signIn = useSignIn({ ...options.mutation, transport: options.transport ?? options.mutation?.transport });
  // GIS keeps the callback it was given: it must reach the latest mutation and options.
  const latest = useRef({ mutate: signIn.mutate, gisOptions: options.gisOptions });
  latest.current = { mutate: signIn.mutate, gisOptions: options.gisOptions };
  const [initializedWith, setInitializedWith] = useState<string | undefined>(undefined);
  const current = nonce.data?.nonce;
  const { clientId } = options;

  useEffect(() => {
    if (gis === undefined || current === undefined) return;
    gis.initialize({
      ...latest.current.gisOptions,
      client_id: clientId,
      nonce: current,
      callback: ({ credential }) => latest.current.mutate({ googleIdToken: credential }),
    });
    setInitializedWith(current);
  }, [gis, current, clientId]);

  return { nonce, ready: current !== undefined && initializedWith === current, signIn };
}
