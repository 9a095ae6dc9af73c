// Peer baseline: a bare @connectrpc/connect-node echo (`grpc.health.v1.Health/Check`).
//
// Usage: tsx connect_node_echo.ts H1_PORT H2C_PORT
// One handler, two plain-text listeners: HTTP/1.1 (node:http) for Connect JSON,
// and HTTP/2 with prior knowledge (node:http2, h2c) for gRPC. Node 20's
// cleartext http2 server does not fall back to HTTP/1.1, hence two ports.
// Prints "listening h1=PORT h2c=PORT" once both listen.

import * as http from "node:http";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";

import { create } from "@bufbuild/protobuf";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";

import {
  Health,
  HealthCheckResponseSchema,
  HealthCheckResponse_ServingStatus,
} from "../gen/ts/grpc/health/v1/health_pb.js";

interface NodeProcess {
  argv: string[];
  stdout: { write(text: string): boolean };
}
const proc = (globalThis as unknown as { process: NodeProcess }).process;

const serving = create(HealthCheckResponseSchema, {
  status: HealthCheckResponse_ServingStatus.SERVING,
});

const handler = connectNodeAdapter({
  routes: (router: ConnectRouter) => {
    router.service(Health, {
      check: () => serving,
      async *watch() {
        yield serving;
      },
    });
  },
});

const h1 = http.createServer(handler);
const h2c = http2.createServer(handler);

function listen(server: http.Server | http2.Http2Server, port: number): Promise<number> {
  return new Promise((resolve) => {
    server.listen(port, "127.0.0.1", () => resolve((server.address() as AddressInfo).port));
  });
}

const [h1Port, h2cPort] = await Promise.all([
  listen(h1, Number(proc.argv[2] ?? 0)),
  listen(h2c, Number(proc.argv[3] ?? 0)),
]);
proc.stdout.write(`listening h1=${h1Port} h2c=${h2cPort}\n`);
