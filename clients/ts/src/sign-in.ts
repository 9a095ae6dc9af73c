import { timestampDate } from "@bufbuild/protobuf/wkt";
import { ConnectError, createClient, type CallOptions, type Transport } from "@connectrpc/connect";

import { AuthService, type SignInResponse } from "./gen/expense/auth/v1/auth_pb.js";
import type { GoogleAccountsId, GoogleIdConfiguration } from "./google.js";

/** A nonce to pass to Google Identity Services, bound to a short-lived cookie. */
export interface SignInNonce {
  nonce: string;
  /** When the nonce (and its cookie) stop being accepted. */
  expireTime: Date | undefined;
}

/**
 * Step 1 of a sign-in: CreateSignInNonce. The server sets an HttpOnly
 * pre-sign-in cookie bound to the nonce; hand the nonce to GIS (`initialize`'s
 * `nonce` option), which puts it into the ID token. Only the latest nonce of a
 * browser is accepted, so initialize GIS again whenever you create a new one.
 */
export async function createSignInNonce(transport: Transport, options?: CallOptions): Promise<SignInNonce> {
  const response = await createClient(AuthService, transport).createSignInNonce({}, options);
  return {
    nonce: response.nonce,
    expireTime: response.expireTime === undefined ? undefined : timestampDate(response.expireTime),
  };
}

/**
 * Step 2: SignIn with the `credential` that GIS passed to its callback. The
 * response carries the user and the new session; the session cookie arrives in
 * a `Set-Cookie` header that the browser keeps (scripts cannot read it).
 */
export function signInWithGoogleCredential(
  transport: Transport,
  credential: string,
  options?: CallOptions,
): Promise<SignInResponse> {
  return createClient(AuthService, transport).signIn({ googleIdToken: credential }, options);
}

/** Options of {@link initializeGoogleSignIn}. */
export interface GoogleSignInOptions {
  /** The OAuth client id of the frontend (one of the server's `GOOGLE_CLIENT_ID`). */
  clientId: string;
  /** Called with the signed-in user and session. */
  onSignIn: (response: SignInResponse) => void;
  /** Called when SignIn fails, e.g. with `resource_exhausted` (see retryAfterSeconds). */
  onError: (error: ConnectError) => void;
  /** More options for `google.accounts.id.initialize` (not `client_id`, `callback`, `nonce`). */
  gisOptions?: Omit<Partial<GoogleIdConfiguration>, "client_id" | "callback" | "nonce">;
}

/**
 * The whole flow for apps without React: CreateSignInNonce, then
 * `gis.initialize` with that nonce and a callback that calls SignIn with the
 * credential. Render the button or call `gis.prompt()` once this resolves.
 * Each credential can be used once: after a failed sign-in, call this again for
 * a new nonce.
 */
export async function initializeGoogleSignIn(
  transport: Transport,
  gis: GoogleAccountsId,
  options: GoogleSignInOptions,
): Promise<SignInNonce> {
  const nonce = await createSignInNonce(transport);
  gis.initialize({
    ...options.gisOptions,
    client_id: options.clientId,
    nonce: nonce.nonce,
    callback: ({ credential }) => {
      signInWithGoogleCredential(transport, credential).then(options.onSignIn, (error: unknown) =>
        options.onError(ConnectError.from(error)),
      );
    },
  });
  return nonce;
}
