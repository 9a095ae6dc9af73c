import { Code, type ConnectError } from "@connectrpc/connect";
import { loadedGoogleAccountsId, SecurityEvent_Kind } from "@expense/auth-client";
import {
  useGetCurrentUser,
  useListSecurityEvents,
  useListSessions,
  useRevokeOtherSessions,
  useRevokeSession,
  useSignOut,
} from "@expense/auth-client/react";

import { formatTime } from "./format.js";

export function Account() {
  const { data } = useGetCurrentUser();
  // Google's advice on sign-out: stop One Tap from signing the user straight back in.
  const signOut = useSignOut({ onSuccess: () => loadedGoogleAccountsId()?.disableAutoSelect() });
  const user = data?.user;
  return (
    <section data-testid="signed-in">
      <h2>Signed in</h2>
      {user !== undefined && (
        <dl data-testid="profile">
          <dt>Name</dt>
          <dd data-testid="user-name">{user.displayName}</dd>
          <dt>Email</dt>
          <dd data-testid="user-email">{user.email}</dd>
          <dt>User id</dt>
          <dd data-testid="user-id">{user.id}</dd>
          <dt>Currency, time zone</dt>
          <dd>
            {user.currencyCode || "–"}, {user.timeZone || "–"}
          </dd>
        </dl>
      )}
      <button data-testid="sign-out" disabled={signOut.isPending} onClick={() => signOut.mutate({})}>
        Sign out
      </button>
      <Failure error={signOut.error} />
      <Sessions />
      <SecurityEvents />
    </section>
  );
}

function Sessions() {
  const sessions = useListSessions();
  const revoke = useRevokeSession();
  const revokeOthers = useRevokeOtherSessions();
  const list = sessions.data?.sessions ?? [];
  return (
    <section data-testid="sessions" data-fetching={sessions.isFetching}>
      <h3>Where you are signed in</h3>
      <button data-testid="refresh-sessions" onClick={() => void sessions.refetch()}>
        Refresh
      </button>
      <ul>
        {list.map((session) => (
          <li key={session.id} data-testid="session" data-session-id={session.id} data-current={session.current}>
            {session.userAgent || "Unknown client"}, signed in {formatTime(session.createTime)}, last active{" "}
            {formatTime(session.lastSeenTime)}{" "}
            {session.current ? (
              <strong>(this browser)</strong>
            ) : (
              <button
                data-testid="revoke-session"
                disabled={revoke.isPending}
                onClick={() => revoke.mutate({ sessionId: session.id })}
              >
                Sign out this session
              </button>
            )}
          </li>
        ))}
      </ul>
      {list.some((session) => !session.current) && (
        <button disabled={revokeOthers.isPending} onClick={() => revokeOthers.mutate({})}>
          Sign out everywhere else
        </button>
      )}
      <Failure error={sessions.error ?? revoke.error ?? revokeOthers.error} />
    </section>
  );
}

const EVENT_LABELS: Record<SecurityEvent_Kind, string> = {
  [SecurityEvent_Kind.UNSPECIFIED]: "Event",
  [SecurityEvent_Kind.SIGN_IN]: "Signed in",
  [SecurityEvent_Kind.SIGN_IN_FAILED]: "Sign-in refused",
  [SecurityEvent_Kind.SIGN_OUT]: "Signed out",
  [SecurityEvent_Kind.SESSION_REVOKED]: "Session signed out from another browser",
  [SecurityEvent_Kind.RATE_LIMITED]: "Rate limited",
  [SecurityEvent_Kind.DATA_EXPORTED]: "Data exported",
  [SecurityEvent_Kind.ACCOUNT_DISABLED]: "Account disabled",
  [SecurityEvent_Kind.ACCOUNT_ENABLED]: "Account enabled",
};

function SecurityEvents() {
  const events = useListSecurityEvents({ pageSize: 10 });
  return (
    <section>
      <h3>Recent security activity</h3>
      <ol data-testid="security-events">
        {(events.data?.securityEvents ?? []).map((event, i) => (
          <li key={i} data-testid="security-event" data-kind={SecurityEvent_Kind[event.kind]}>
            {EVENT_LABELS[event.kind]}, {formatTime(event.time)}
            {event.userAgent && `, ${event.userAgent}`}
          </li>
        ))}
      </ol>
      <Failure error={events.error} />
    </section>
  );
}

function Failure({ error }: { error: ConnectError | null }) {
  if (error === null) return null;
  return (
    <p role="alert">
      Failed ({Code[error.code]}): {error.rawMessage}
    </p>
  );
}
