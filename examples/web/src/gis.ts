import { loadedGoogleAccountsId, type GoogleAccountsId } from "@expense/auth-client";
import { useEffect, useState } from "react";

const GIS_SRC = "https://accounts.google.com/gsi/client";

let loading: Promise<GoogleAccountsId> | undefined;

/** Google Identity Services, loaded once (unless the page already has it). */
function loadGis(): Promise<GoogleAccountsId> {
  const present = loadedGoogleAccountsId();
  if (present !== undefined) return Promise.resolve(present);
  loading ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = GIS_SRC;
    script.async = true;
    script.onload = () => {
      const gis = loadedGoogleAccountsId();
      if (gis === undefined) reject(new Error("Google Identity Services did not load"));
      else resolve(gis);
    };
    script.onerror = () => reject(new Error("Google Identity Services could not be loaded"));
    document.head.append(script);
  });
  return loading;
}

/** GIS once loaded, `undefined` before; `enabled: false` never loads it. */
export function useGis(enabled: boolean): { gis: GoogleAccountsId | undefined; error: Error | undefined } {
  const [state, setState] = useState<{ gis?: GoogleAccountsId; error?: Error }>({});
  useEffect(() => {
    if (!enabled) return;
    let live = true;
    loadGis().then(
      (gis) => live && setState({ gis }),
      (error: unknown) => live && setState({ error: error instanceof Error ? error : new Error(String(error)) }),
    );
    return () => {
      live = false;
    };
  }, [enabled]);
  return { gis: state.gis, error: state.error };
}
