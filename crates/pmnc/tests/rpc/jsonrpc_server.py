"""A JSON-RPC 2.0 server of jsonrpcserver (PyPI) behind Python's http.server, for pmnc's
jsonrpc resource. Prints its port, then serves until killed. Paths: / (the methods),
/broken (the response breaks off), /garbage (not JSON-RPC)."""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jsonrpcserver import Error, Success, dispatch, method

noted = []


@method
def echo(*args):
    return Success(args[0] if len(args) == 1 else list(args))


@method
def named(a, b):
    return Success(a + b)


@method
def oops():
    return Error(-32050, "oops happened", {"why": "testing"})


@method
def note(n):
    noted.append(n)
    return Success(None)


@method
def total():
    return Success(sum(noted))


@method
def slow():
    time.sleep(3)
    return Success("late")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
        if self.path == "/broken":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "1000")
            self.end_headers()
            self.wfile.write(b'{"jsonrpc": "2.0", "res')
            self.wfile.flush()
            self.close_connection = True
            return
        out = b"<html>busy</html>" if self.path == "/garbage" else dispatch(body).encode()
        self.send_response(200 if out else 204)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
sys.stdout.close()
server.serve_forever()
