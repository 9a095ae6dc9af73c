/** The page's settings, read at start from config.json beside index.html. */
export interface Config {
  /** Where the API is served; this page's origin must be in its CORS_ALLOWED_ORIGIN. */
  apiBaseUrl: string;
  /** The OAuth client id for Google Identity Services; empty: no Google button. */
  googleClientId: string;
  /** Offer the development sign-in (paste a token from `expense-auth dev-token`). */
  developmentSignIn: boolean;
}

// Read at run time rather than built in, so one build serves any API: the
// deployment (or the test) writes config.json next to the page.
export async function loadConfig(): Promise<Config> {
  const response = await fetch(new URL("config.json", document.baseURI), { cache: "no-store" });
  if (!response.ok) throw new Error(`config.json: HTTP ${response.status}`);
  const raw = (await response.json()) as Partial<Config>;
  if (typeof raw.apiBaseUrl !== "string" || raw.apiBaseUrl === "") {
    throw new Error("config.json: apiBaseUrl is missing");
  }
  return {
    apiBaseUrl: raw.apiBaseUrl,
    googleClientId: typeof raw.googleClientId === "string" ? raw.googleClientId : "",
    developmentSignIn: raw.developmentSignIn === true,
  };
}
