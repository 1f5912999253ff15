"""A small SMSC for the smpp tests, on smpplib's PDU classes (parsing and building every PDU;
nothing here is written at the wire level but the deliberately broken frames).

Usage: python3 smsc.py PORT SYSTEM_ID PASSWORD
Events go to stdout as JSON lines; commands come from stdin as JSON lines:
  {"cmd": "deliver", "tag": "t1", "text": "hi", "data_coding": 0, "esm_class": 0,
   "hex": "...", "tlvs": {"message_state": 2}, "redeliver": true}
  {"cmd": "throttle", "n": 2}      next n submit_sm answered ESME_RTHROTTLED
  {"cmd": "data", "tag": "t2", "text": "hi"}   a data_sm with message_payload
  {"cmd": "enquire"}               an enquire_link to the receiving session
  {"cmd": "malformed"}             a deliver_sm whose body ends early (length is right)
  {"cmd": "bad_length"}            a header announcing 0x7fffffff octets, then close
  {"cmd": "cut"}                   half a header, then close
"""

import json
import socket
import socketserver
import struct
import sys
import threading
import time

from smpplib import consts, smpp

PORT, SYSTEM_ID, PASSWORD = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lock = threading.Lock()
state = {"throttle": 0, "next_id": 1, "sessions": [], "seq": 1000}


class Numbers:
    """What smpplib's PDU classes ask of a client: sequence numbers (ours are set explicitly)."""

    sequence = 0

    def next_sequence(self):
        return next_seq()


def make(name, sequence, **kw):
    """A PDU with its sequence number (smpplib only takes it from a client otherwise)."""
    pdu = smpp.make_pdu(name, client=Numbers(), **kw)
    pdu.sequence = sequence
    return pdu


def emit(**event):
    with lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def next_seq():
    with lock:
        state["seq"] += 1
        return state["seq"]


def text_of(data_coding, data):
    if data_coding == 8:
        return data.decode("utf-16-be", "replace")
    return data.decode("latin-1")


class Session(socketserver.BaseRequestHandler):
    def setup(self):
        self.bound = None
        self.waiting = {}  # sequence -> (tag, sent at, deliver kwargs, attempt)
        self.wlock = threading.Lock()

    def send(self, pdu):
        data = pdu.generate()
        with self.wlock:
            self.request.sendall(data)

    def raw(self, data, close=False):
        with self.wlock:
            try:
                self.request.sendall(data)
                if close:
                    self.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer may close first, as it should after a bad header

    def read_pdu(self):
        head = self.recv_exact(4)
        if head is None:
            return None
        (length,) = struct.unpack(">L", head)
        body = self.recv_exact(length - 4)
        if body is None:
            return None
        return head + body

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.request.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def deliver(self, tag, kw, attempt=1, name="deliver_sm"):
        seq = next_seq()
        pdu = make(name, seq, **kw)
        self.waiting[seq] = (tag, time.monotonic(), kw, attempt)
        self.send(pdu)

    def handle(self):
        with lock:
            state["sessions"].append(self)
        try:
            self.loop()
        finally:
            with lock:
                state["sessions"].remove(self)
            emit(ev="closed", bound=self.bound)

    def loop(self):
        while True:
            data = self.read_pdu()
            if data is None:
                return
            pdu = smpp.parse_pdu(data, client=Numbers(), allow_unknown_opt_params=True)
            cmd = pdu.command
            if cmd in ("bind_transmitter", "bind_receiver", "bind_transceiver"):
                ok = pdu.system_id.decode() == SYSTEM_ID and pdu.password.decode() == PASSWORD
                status = consts.SMPP_ESME_ROK if ok else consts.SMPP_ESME_RINVPASWD
                resp = make(cmd + "_resp", pdu.sequence, status=status, system_id="TestSMSC")
                self.send(resp)
                emit(ev="bind", kind=cmd, system_id=pdu.system_id.decode(), status=status)
                if ok:
                    self.bound = cmd
            elif cmd == "enquire_link":
                self.send(make("enquire_link_resp", pdu.sequence))
                emit(ev="enquire_link", bound=self.bound)
            elif cmd == "enquire_link_resp":
                emit(ev="enquire_link_resp", bound=self.bound)
            elif cmd == "unbind":
                self.send(make("unbind_resp", pdu.sequence))
                emit(ev="unbind", bound=self.bound)
                return
            elif cmd == "submit_sm":
                self.submit(pdu)
            elif cmd in ("deliver_sm_resp", "data_sm_resp"):
                tag, sent, kw, attempt = self.waiting.pop(pdu.sequence, (None, 0, None, 0))
                emit(ev=cmd, tag=tag, status=pdu.status, latency=time.monotonic() - sent, attempt=attempt)
                if pdu.status != 0 and kw is not None and attempt < 5 and kw.pop("_redeliver", None) is not None:
                    kw["_redeliver"] = True
                    threading.Timer(0.2, self.deliver, (tag, dict(kw), attempt + 1)).start()
            elif cmd == "generic_nack":
                emit(ev="generic_nack", status=pdu.status, sequence=pdu.sequence)
            else:
                emit(ev="other", command=cmd)

    def submit(self, pdu):
        with lock:
            throttled = state["throttle"] > 0
            if throttled:
                state["throttle"] -= 1
            message_id = "msg-%d" % state["next_id"]
            if not throttled:
                state["next_id"] += 1
        status = consts.SMPP_ESME_RTHROTTLED if throttled else consts.SMPP_ESME_ROK
        sm = pdu.short_message or b""
        udh = None
        if pdu.esm_class & 0x40:
            n = sm[0]
            udh = list(sm[1 : 1 + n])
            sm = sm[1 + n :]
        emit(
            ev="submit_sm",
            status=status,
            message_id=None if throttled else message_id,
            source=pdu.source_addr.decode(),
            source_ton=pdu.source_addr_ton,
            destination=pdu.destination_addr.decode(),
            destination_ton=pdu.dest_addr_ton,
            data_coding=pdu.data_coding,
            esm_class=pdu.esm_class,
            registered_delivery=pdu.registered_delivery,
            udh=udh,
            hex=sm.hex(),
            text=text_of(pdu.data_coding, sm),
        )
        if throttled:
            resp = make("submit_sm_resp", pdu.sequence, status=status)
        else:
            resp = make("submit_sm_resp", pdu.sequence, message_id=message_id)
        self.send(resp)


def receiving():
    with lock:
        for s in state["sessions"]:
            if s.bound in ("bind_receiver", "bind_transceiver"):
                return s
    return None


def commands():
    for line in sys.stdin:
        try:
            command(json.loads(line))
        except OSError as e:
            emit(ev="error", error=str(e))


def command(c):
    s = receiving()
    if c["cmd"] == "throttle":
        with lock:
            state["throttle"] = c["n"]
        emit(ev="ok", cmd="throttle")
        return
    if s is None:
        emit(ev="no_session", cmd=c["cmd"])
        return
    if c["cmd"] == "deliver":
        dc = c.get("data_coding", 0)
        sm = bytes.fromhex(c["hex"]) if "hex" in c else (c["text"].encode("utf-16-be") if dc == 8 else c["text"].encode("latin-1"))
        kw = dict(
            source_addr_ton=1, source_addr_npi=1, source_addr=c.get("source", "4915550001"),
            dest_addr_ton=0, dest_addr_npi=1, destination_addr=c.get("destination", "4000"),
            esm_class=c.get("esm_class", 0), data_coding=dc, short_message=sm,
        )
        kw.update(c.get("tlvs", {}))
        if c.get("redeliver"):
            kw["_redeliver"] = True
        s.deliver(c["tag"], kw)
    elif c["cmd"] == "data":
        kw = dict(
            source_addr_ton=1, source_addr_npi=1, source_addr="4915550003",
            dest_addr_ton=0, dest_addr_npi=1, destination_addr="4000",
            data_coding=0, message_payload=c["text"].encode("latin-1"),
        )
        s.deliver(c["tag"], kw, name="data_sm")
    elif c["cmd"] == "enquire":
        s.send(make("enquire_link", next_seq()))
    elif c["cmd"] == "malformed":
        body = b"\x00\x01\x01" + b"4915"  # service_type, ton, npi, then the address never ends
        s.raw(struct.pack(">LLLL", 16 + len(body), 0x05, 0, next_seq()) + body)
    elif c["cmd"] == "bad_length":
        s.raw(struct.pack(">LLLL", 0x7FFFFFFF, 0x05, 0, next_seq()), close=True)
    elif c["cmd"] == "cut":
        s.raw(struct.pack(">LLLL", 60, 0x05, 0, next_seq())[:10], close=True)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    server = Server(("127.0.0.1", PORT), Session)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    emit(ev="ready", port=PORT)
    commands()
    server.shutdown()


if __name__ == "__main__":
    main()
