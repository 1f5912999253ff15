"""An OTLP/HTTP trace receiver built on the official protobuf definitions (PyPI's
opentelemetry-proto): prints its port, then one JSON line per export request it accepted, with
trace and span ids as lower-case hex. With --fail N it answers the first N exports 503."""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

FAIL = int(sys.argv[sys.argv.index("--fail") + 1]) if "--fail" in sys.argv else 0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global FAIL
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if FAIL > 0:
            FAIL -= 1
            self.send_response(503)
            self.send_header("content-length", "4")
            self.end_headers()
            self.wfile.write(b"busy")
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for rs in request.resource_spans:
            resource = {kv.key: MessageToDict(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    d = MessageToDict(s, preserving_proto_field_name=True)
                    d["trace_id"] = s.trace_id.hex()
                    d["span_id"] = s.span_id.hex()
                    d["parent_span_id"] = s.parent_span_id.hex()
                    d["start_time_unix_nano"] = s.start_time_unix_nano
                    d["end_time_unix_nano"] = s.end_time_unix_nano
                    d["scope"] = ss.scope.name
                    d["resource"] = resource
                    d["attributes"] = {kv.key: MessageToDict(kv.value) for kv in s.attributes}
                    spans.append(d)
        print(json.dumps({"path": self.path, "content_type": self.headers.get("content-type"),
                          "authorization": self.headers.get("authorization"), "spans": spans}), flush=True)
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
