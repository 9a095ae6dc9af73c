import { defineConfig } from "vite";

// No @vitejs/plugin-react: esbuild compiles the JSX (tsconfig's "jsx": "react-jsx"),
// which is all a build needs; the plugin only adds Fast Refresh to `vite dev`.
export default defineConfig({
  // Relative asset URLs: the built page works from any directory it is served from.
  base: "./",
  server: { port: 5173, strictPort: true },
  build: { target: "es2022", sourcemap: true },
});
