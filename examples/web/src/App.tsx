import { useSession } from "@expense/auth-client/react";

import { Account } from "./Account.js";
import type { Config } from "./config.js";
import { SignIn } from "./SignIn.js";

export function App({ config }: { config: Config }) {
  const state = useSession();
  return (
    <main data-testid="app" data-state={state.status}>
      <h1>expense-auth example</h1>
      {state.status === "loading" && <p>Loading…</p>}
      {state.status === "error" && (
        <p role="alert" data-testid="session-error">
          Cannot reach the API ({state.error.code}): {state.error.rawMessage}{" "}
          <button onClick={() => void state.query.refetch()}>Try again</button>
        </p>
      )}
      {state.status === "signed-out" && <SignIn config={config} />}
      {state.status === "signed-in" && <Account />}
    </main>
  );
}
