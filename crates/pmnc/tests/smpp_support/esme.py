"""An ESME on smpplib's own client, for the smpp interface's server side (listen = ...).

Usage: python3 esme.py HOST PORT SYSTEM_ID PASSWORD
Binds once with a wrong password (expecting the refusal), then as transmitter: submits a UCS-2
text, a text the handler fails on, and enquire_link, then unbinds. Prints one JSON object.
"""

import json
import sys

import smpplib.client
import smpplib.exceptions

host, port, system_id, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = {}

bad = smpplib.client.Client(host, port, timeout=5)
bad.connect()
try:
    bad.bind_transmitter(system_id=system_id, password="wrong")
    out["bad_bind"] = 0
except smpplib.exceptions.PDUError as e:
    out["bad_bind"] = e.args[1]
bad.disconnect()

c = smpplib.client.Client(host, port, timeout=5)
c.connect()
c.bind_transmitter(system_id=system_id, password=password)


def submit(text, dc):
    c.send_message(
        source_addr_ton=1, source_addr_npi=1, source_addr="4915550002",
        dest_addr_ton=0, dest_addr_npi=1, destination_addr="4000",
        data_coding=dc, short_message=text.encode("utf-16-be" if dc == 8 else "latin-1"),
    )
    resp = c.read_pdu()
    return {"command": resp.command, "status": resp.status, "message_id": (resp.message_id or b"").decode()}


out["ucs2"] = submit("Привет from smpplib", 8)
out["fail"] = submit("please fail", 0)
c.send_pdu(smpplib.smpp.make_pdu("enquire_link", client=c))
out["enquire_link"] = c.read_pdu().command
out["unbind"] = c.unbind().command
c.disconnect()
print(json.dumps(out))
