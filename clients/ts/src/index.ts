// @expense/auth-client: the browser client of expense-auth.
//
// - the generated messages and services of the contract (protoc-gen-es),
// - createExpenseAuthTransport: Connect over fetch with the browser's cookies,
// - the sign-in flow (CreateSignInNonce → Google Identity Services → SignIn),
// - typed checks for the errors an app must handle.
// React hooks (TanStack Query via connect-query) are in "@expense/auth-client/react".

export * from "./gen/expense/auth/v1/auth_pb.js";
export * from "./gen/expense/user/v1/user_pb.js";
export { createExpenseAuthTransport, type ExpenseAuthTransportOptions } from "./transport.js";
export {
  isResourceExhausted,
  isUnauthenticated,
  retryAfterSeconds,
  shouldRetry,
  type ConnectErrorWithCode,
} from "./errors.js";
export {
  createSignInNonce,
  initializeGoogleSignIn,
  signInWithGoogleCredential,
  type GoogleSignInOptions,
  type SignInNonce,
} from "./sign-in.js";
export {
  loadedGoogleAccountsId,
  type GoogleAccountsId,
  type GoogleButtonConfiguration,
  type GoogleCredentialResponse,
  type GoogleIdConfiguration,
} from "./google.js";
