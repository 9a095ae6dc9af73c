import { TransportProvider } from "@connectrpc/connect-query";
import { createExpenseAuthTransport } from "@expense/auth-client";
import { createExpenseAuthQueryClient } from "@expense/auth-client/react";
import { QueryClientProvider } from "@tanstack/react-query";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";

import { App } from "./App.js";
import { loadConfig } from "./config.js";

const root = createRoot(document.getElementById("root") as HTMLElement);

loadConfig().then(
  (config) => {
    const transport = createExpenseAuthTransport({ baseUrl: config.apiBaseUrl });
    const queryClient = createExpenseAuthQueryClient();
    root.render(
      <StrictMode>
        <TransportProvider transport={transport}>
          <QueryClientProvider client={queryClient}>
            <App config={config} />
          </QueryClientProvider>
        </TransportProvider>
      </StrictMode>,
    );
  },
  (error: unknown) => {
    root.render(<p role="alert">Cannot start: {String(error)}</p>);
  },
);
