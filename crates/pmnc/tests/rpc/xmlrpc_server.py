"""Python's SimpleXMLRPCServer for pmnc's xmlrpc resource. Prints its port, then serves until
killed."""
import datetime
import sys
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCServer


def echo(*args):
    return args[0] if len(args) == 1 else list(args)


def kinds():
    return {"int": 7, "bool": True, "str": "caf\u00e9 <&>", "double": 2.5, "when": datetime.datetime(2026, 7, 6, 12, 30, 5),
            "bytes": b"\x00\xffz", "list": [1, "a", None], "empty": [], "nothing": None, "struct": {"k": "v"}}


def fault():
    raise xmlrpc.client.Fault(7, "seven went wrong")


def boom():
    raise ValueError("python side")


server = SimpleXMLRPCServer(("127.0.0.1", 0), allow_none=True, use_builtin_types=True, logRequests=False)
for f in [echo, kinds, fault, boom]:
    server.register_function(f)
print(server.server_address[1], flush=True)
sys.stdout.close()
server.serve_forever()
