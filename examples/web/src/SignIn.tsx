import { Code, type ConnectError } from "@connectrpc/connect";
import { isResourceExhausted, isUnauthenticated, retryAfterSeconds, type GoogleAccountsId } from "@expense/auth-client";
import { useGoogleSignIn, useSignIn, useSignInNonce } from "@expense/auth-client/react";
import { useEffect, useRef, useState } from "react";

import type { Config } from "./config.js";
import { formatDuration } from "./format.js";
import { useGis } from "./gis.js";

export function SignIn({ config }: { config: Config }) {
  const google = config.googleClientId !== "";
  const { gis, error } = useGis(google);
  return (
    <section data-testid="signed-out">
      <h2>Sign in</h2>
      {google && error !== undefined && <p role="alert">{error.message}</p>}
      {google && <GoogleSignIn gis={gis} clientId={config.googleClientId} />}
      {config.developmentSignIn && <DevelopmentSignIn />}
    </section>
  );
}

/** CreateSignInNonce → Google Identity Services → SignIn, all in useGoogleSignIn. */
function GoogleSignIn({ gis, clientId }: { gis: GoogleAccountsId | undefined; clientId: string }) {
  const { ready, signIn, nonce } = useGoogleSignIn(gis, { clientId });
  const button = useRef<HTMLDivElement>(null);
  useEffect(() => {
    if (ready && gis !== undefined && button.current !== null) {
      gis.renderButton(button.current, { type: "standard", theme: "outline", size: "large", text: "signin_with" });
    }
  }, [ready, gis]);
  return (
    <div data-testid="google-sign-in">
      <div ref={button} />
      {signIn.isPending && <p>Signing in…</p>}
      <SignInError error={signIn.error ?? nonce.error} />
    </div>
  );
}

/**
 * For development servers (DEV_IDENTITY_ENABLED): a token from
 * `expense-auth dev-token`, minted for this page's nonce, goes where Google's
 * credential would.
 */
function DevelopmentSignIn() {
  const nonce = useSignInNonce();
  const signIn = useSignIn();
  const [token, setToken] = useState("");
  return (
    <form
      data-testid="dev-sign-in"
      onSubmit={(event) => {
        event.preventDefault();
        signIn.mutate({ googleIdToken: token.trim() }, { onSettled: () => setToken("") });
      }}
    >
      <h3>Development sign-in</h3>
      <p>Mint a token for this sign-in with the server's DATA_DIR, then paste it here:</p>
      <pre>
        expense-auth dev-token --email you@example.com --nonce{" "}
        <span data-testid="dev-nonce">{nonce.data?.nonce ?? "…"}</span>
      </pre>
      <textarea
        name="token"
        aria-label="ID token"
        rows={3}
        cols={60}
        value={token}
        onChange={(event) => setToken(event.target.value)}
      />
      <button type="submit" disabled={token.trim() === "" || signIn.isPending}>
        Sign in
      </button>
      <SignInError error={signIn.error ?? nonce.error} />
    </form>
  );
}

function SignInError({ error }: { error: ConnectError | null }) {
  if (error === null) return null;
  const code = Code[error.code];
  if (isResourceExhausted(error)) {
    const seconds = retryAfterSeconds(error);
    return (
      <p role="alert" data-testid="sign-in-error" data-code={code} data-retry-after={seconds ?? ""}>
        Too many sign-ins. {seconds === undefined ? "Try again later." : `Try again in ${formatDuration(seconds)}.`}
      </p>
    );
  }
  return (
    <p role="alert" data-testid="sign-in-error" data-code={code}>
      {isUnauthenticated(error) ? "Sign-in was not accepted" : `Sign-in failed (${code})`}: {error.rawMessage}
    </p>
  );
}
