#!/usr/bin/env python3
"""A small OTLP trace receiver, for tests: spans in, JSON lines out.

Built from the published OpenTelemetry protobuf definitions (pip packages
`opentelemetry-proto` and `grpcio`), so it checks what the proxy sends against the
real wire format rather than against the proxy's own idea of it.

It listens on loopback for OTLP over gRPC (`TraceService/Export`) and over HTTP
(`POST /v1/traces`, protobuf body), and writes one JSON object per line:

  {"ready": {"grpc": "127.0.0.1:P", "http": "127.0.0.1:Q"}}   once both listen
  {"transport": "grpc", "trace_id": "...", "span_id": "...", ...}   per span

Ids are lowercase hex (`parent_span_id` is "" for a root span); `attributes` and
`resource` map keys to plain JSON values; `status` is {"code": "UNSET"|"OK"|"ERROR",
"message": ...}; `kind` is the OTLP name without its prefix ("SERVER", "CLIENT").
A span is written (and flushed) before its export is answered, so once an exporter
has its answer, the span is in the output.

    python3 scripts/otlp_receiver.py [--grpc ADDR] [--http ADDR] [--out FILE]
                                     [--exit-on-stdin-eof]
"""

import argparse
import gzip
import json
import os
import sys
import threading
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )
    from opentelemetry.proto.trace.v1 import trace_pb2
except ImportError as e:  # fail loudly: a test without its receiver proves nothing
    sys.stderr.write(
        f"otlp_receiver: missing Python package ({e}); install them with:\n"
        "  python3 -m pip install opentelemetry-proto grpcio\n"
    )
    sys.exit(2)


def any_value(v):
    """An OTLP AnyValue as a plain JSON value."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def span_kind(k):
    name = trace_pb2.Span.SpanKind.Name(k)
    return name.removeprefix("SPAN_KIND_")


class Sink:
    """Writes lines whole, one writer at a time (both servers are threaded)."""

    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def line(self, obj):
        text = json.dumps(obj, sort_keys=True)
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def request(self, transport, req):
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.line(
                        {
                            "transport": transport,
                            "resource": resource,
                            "scope": ss.scope.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "trace_state": s.trace_state,
                            "flags": s.flags,
                            "name": s.name,
                            "kind": span_kind(s.kind),
                            "start_ns": s.start_time_unix_nano,
                            "end_ns": s.end_time_unix_nano,
                            "attributes": attributes(s.attributes),
                            "status": {
                                "code": STATUS.get(s.status.code, str(s.status.code)),
                                "message": s.status.message,
                            },
                        }
                    )


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        self.sink.request("grpc", request)
        return trace_service_pb2.ExportTraceServiceResponse()


def http_handler(sink):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass  # stdout is for spans

        def answer(self, status, body=b"", ctype="application/x-protobuf"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if self.path.split("?")[0] != "/v1/traces":
                return self.answer(404, b"only /v1/traces\n", "text/plain")
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            if not self.headers.get("Content-Type", "").startswith("application/x-protobuf"):
                return self.answer(415, b"protobuf only\n", "text/plain")
            req = trace_service_pb2.ExportTraceServiceRequest()
            try:
                req.ParseFromString(body)
            except Exception as e:  # a malformed export is the proxy's bug: say so
                return self.answer(400, f"bad protobuf: {e}\n".encode(), "text/plain")
            sink.request("http", req)
            self.answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    return Handler


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", default="127.0.0.1:0", help="gRPC listen address")
    p.add_argument("--http", default="127.0.0.1:0", help="HTTP listen address")
    p.add_argument("--out", help="write JSON lines here instead of stdout")
    p.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin closes (a test's receiver never outlives the test)",
    )
    args = p.parse_args()
    out = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout
    sink = Sink(out)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(sink), server)
    grpc_port = server.add_insecure_port(args.grpc)
    if grpc_port == 0:
        sys.stderr.write(f"otlp_receiver: cannot listen on {args.grpc}\n")
        sys.exit(1)
    server.start()
    grpc_host, _ = split_addr(args.grpc)

    httpd = ThreadingHTTPServer(split_addr(args.http), http_handler(sink))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    http_host, http_port = httpd.server_address[:2]

    sink.line(
        {"ready": {"grpc": f"{grpc_host}:{grpc_port}", "http": f"{http_host}:{http_port}"}}
    )
    if args.exit_on_stdin_eof:
        sys.stdin.read()
        os._exit(0)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
