// tsc copies only what it compiles; the CSI driver loads its .proto at run time beside its .js.
import { cpSync, existsSync, readdirSync } from "node:fs";

const from = "src/csi";
if (existsSync(from)) {
  for (const name of readdirSync(from).filter((file) => file.endsWith(".proto"))) {
    cpSync(`${from}/${name}`, `dist/${from}/${name}`);
  }
}
