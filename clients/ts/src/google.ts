// The part of Google Identity Services (https://accounts.google.com/gsi/client)
// that the sign-in flow uses, typed here so the package needs no @types package.
// The app loads GIS itself and passes `window.google.accounts.id`.

/** What GIS hands to the `callback` of `initialize` after the user chose an account. */
export interface GoogleCredentialResponse {
  /** The ID token (a JWT) to send to SignIn. */
  credential: string;
  /** How the user signed in, e.g. `btn` or `auto`. */
  select_by?: string;
}

/** The options of `google.accounts.id.initialize` used here; GIS accepts more. */
export interface GoogleIdConfiguration {
  client_id: string;
  callback: (response: GoogleCredentialResponse) => void;
  /** The nonce from CreateSignInNonce; Google puts it into the ID token. */
  nonce?: string;
  auto_select?: boolean;
  cancel_on_tap_outside?: boolean;
  use_fedcm_for_prompt?: boolean;
  use_fedcm_for_button?: boolean;
  [option: string]: unknown;
}

/** The options of `google.accounts.id.renderButton`. */
export interface GoogleButtonConfiguration {
  type?: "standard" | "icon";
  theme?: "outline" | "filled_blue" | "filled_black";
  size?: "large" | "medium" | "small";
  text?: "signin_with" | "signup_with" | "continue_with" | "signin";
  shape?: "rectangular" | "pill" | "circle" | "square";
  width?: number;
  locale?: string;
  [option: string]: unknown;
}

/** `google.accounts.id`: the GIS API for "Sign in with Google". */
export interface GoogleAccountsId {
  initialize(config: GoogleIdConfiguration): void;
  renderButton(parent: HTMLElement, options: GoogleButtonConfiguration): void;
  prompt(): void;
  /** Call on sign-out, so that One Tap does not sign the user straight back in. */
  disableAutoSelect(): void;
}

/** `window.google.accounts.id` once the GIS script has loaded, else `undefined`. */
export function loadedGoogleAccountsId(): GoogleAccountsId | undefined {
  const google = (globalThis as { google?: { accounts?: { id?: GoogleAccountsId } } }).google;
  return google?.accounts?.id;
}
