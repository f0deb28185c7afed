#!/usr/bin/env python3
"""A deliberately hostile IMAP source for godwit's robustness tests.

Usage: imap_server.py MODE PORTFILE. Listens on 127.0.0.1 (a free port, written
to PORTFILE) and answers like a one-folder server holding one message, until
the command that MODE attacks:

  malformed        the message FETCH comes back as unparseable garbage
  huge_literal     the message FETCH announces a 2 GB literal
  garbage_after    a 10 MiB literal followed by garbage
  bye_mid_fetch    BYE and a closed socket half-way through the message literal
  silent_examine   EXAMINE/SELECT is never answered
  silent_header    verify's BODY.PEEK[HEADER] FETCH is never answered
"""
import socketserver
import sys
import threading
import time

MODE = sys.argv[1]
MESSAGE = (b"Message-ID: <hostile@test>\r\nSubject: hi\r\nFrom: a@b\r\n"
           b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n")


class Handler(socketserver.StreamRequestHandler):
    def send(self, data):
        self.wfile.write(data)
        self.wfile.flush()

    def hang(self):
        # Keep the socket open and say nothing until the client gives up.
        while self.rfile.readline():
            pass

    def handle(self):
        self.send(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS] hostile ready\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            parts = line.rstrip(b"\r\n").split(b" ", 2)
            tag = parts[0]
            cmd = parts[1].upper() if len(parts) > 1 else b""
            rest = parts[2] if len(parts) > 2 else b""
            if cmd == b"UID" and rest:
                sub, _, rest = rest.partition(b" ")
                cmd = b"UID " + sub.upper()
            if cmd == b"CAPABILITY":
                self.send(b"* CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS\r\n" + tag + b" OK done\r\n")
            elif cmd == b"LOGOUT":
                self.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            elif cmd == b"LIST":
                self.send(b'* LIST (\\HasNoChildren) "." INBOX\r\n' + tag + b" OK done\r\n")
            elif cmd == b"STATUS":
                self.send(b"* STATUS INBOX (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 7)\r\n" + tag + b" OK done\r\n")
            elif cmd in (b"EXAMINE", b"SELECT"):
                if MODE == "silent_examine":
                    self.hang()
                    return
                self.send(b"* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 7] v\r\n"
                          b"* OK [UIDNEXT 2] n\r\n* FLAGS (\\Seen)\r\n" + tag + b" OK [READ-ONLY] done\r\n")
            elif cmd == b"UID FETCH":
                if self.fetch(tag, rest.upper()) == "close":
                    return
            else:
                self.send(tag + b" OK done\r\n")

    def fetch(self, tag, items):
        if b"BODY.PEEK[HEADER]" in items:
            if MODE == "silent_header":
                self.hang()
                return
            head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            self.send(b'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "30-Nov-2026 10:00:00 +0000" '
                      b"RFC822.SIZE %d BODY[HEADER] {%d}\r\n" % (len(MESSAGE), len(head)) + head
                      + b")\r\n" + tag + b" OK done\r\n")
            return
        if b"BODY.PEEK[" not in items:
            self.send(b"* 1 FETCH (UID 1 FLAGS (\\Seen) RFC822.SIZE %d)\r\n" % len(MESSAGE)
                      + tag + b" OK done\r\n")
            return
        if MODE == "malformed":
            self.send(b"* 1 FETCH (UID 1 FLAGS (\\Seen \x00\x01 INTERNALDATE ))) BODY[] {x}\r\n"
                      + tag + b" OK done\r\n")
            self.hang()
        elif MODE == "huge_literal":
            self.send(b'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "30-Nov-2026 10:00:00 +0000" '
                      b"BODY[] {2147483648}\r\n")
            # Then a trickle, as if the 2 GB were on their way.
            chunk = b"x" * 65536
            try:
                for _ in range(32768):
                    self.send(chunk)
            except OSError:
                pass
        elif MODE == "garbage_after":
            big = b"*" * (10 << 20)
            self.send(b'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "30-Nov-2026 10:00:00 +0000" '
                      b"BODY[] {%d}\r\n" % len(big) + big + b" \x01\x02 garbage ((( \r\n" + tag + b" OK done\r\n")
            self.hang()
        elif MODE == "bye_mid_fetch":
            # The FETCH gets BYE for an answer, and the socket closes.
            self.send(b"* BYE server shutting down\r\n")
            return "close"
        else:
            self.send(b'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "30-Nov-2026 10:00:00 +0000" '
                      b"BODY[] {%d}\r\n" % len(MESSAGE) + MESSAGE + b")\r\n" + tag + b" OK done\r\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    srv = Server(("127.0.0.1", 0), Handler)
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    srv.serve_forever()
