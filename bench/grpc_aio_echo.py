"""Peer baseline: a bare grpc.aio echo server (`grpc.health.v1.Health/Check`).

The messages are google.protobuf classes generated now by grpc_tools.protoc from
the project's health.proto, so the peer pays for real (de)serialization, as a
grpcio service would. Usage: python -m bench.grpc_aio_echo PORT STUB_DIR
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
HEALTH_PROTO = "grpc/health/v1/health.proto"


def health_pb2(out: Path) -> ModuleType:
    """The google.protobuf module of health.proto, generated into `out`."""
    target = out / "grpc" / "health" / "v1" / "health_pb2.py"
    if not target.exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={out}",
                str(PROTO_DIR / HEALTH_PROTO),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    # Loaded by file: a `grpc.health` package on sys.path would shadow grpcio.
    spec = importlib.util.spec_from_file_location("bench_health_pb2", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def serve(port: int, stubs: Path) -> None:
    """Serve Health/Check on 127.0.0.1:`port` (h2c) until killed."""
    pb = health_pb2(stubs)
    serving = pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return serving

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=pb.HealthCheckRequest.FromString,
                response_serializer=pb.HealthCheckResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening port={bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2])))
