#!/usr/bin/env python3
"""Token endpoint (RFC 6749 4.4 client credentials) and introspection endpoint
(RFC 7662, what Dovecot's oauth2 passdb asks with introspection_mode = post)
for godwit's OAuth tests.

Usage: token_server.py PORTFILE CLIENT_ID CLIENT_SECRET APP_USER EXPIRES_IN

- POST /token: client authentication by HTTP Basic (RFC 6749 2.3.1); issues
  "cc-N" tokens for APP_USER that expire after EXPIRES_IN seconds.
- POST /introspect: token=T. "cc-N" is active until it expires; "cmd-ADDR" is
  active for ADDR (what the tests' token_command prints); anything else, and
  every token listed by POST /revoke, is inactive.
- GET /stats: {"issued": N}.
"""
import base64
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORTFILE, CLIENT_ID, CLIENT_SECRET, APP_USER, EXPIRES_IN = sys.argv[1:6]
EXPIRES_IN = int(EXPIRES_IN)
lock = threading.Lock()
issued = {}
revoked = set()


def form(s):
    return urllib.parse.quote_plus(s, safe="-._*")


class Handler(BaseHTTPRequestHandler):
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

    def do_GET(self):
        with lock:
            self.reply(200, {"issued": len(issued)})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        fields = urllib.parse.parse_qs(self.rfile.read(n).decode())
        if self.path == "/token":
            want = "Basic " + base64.b64encode(
                ("%s:%s" % (form(CLIENT_ID), form(CLIENT_SECRET))).encode()).decode()
            if self.headers.get("Authorization") != want:
                return self.reply(401, {"error": "invalid_client",
                                        "error_description": "client authentication failed"})
            if fields.get("grant_type") != ["client_credentials"]:
                return self.reply(400, {"error": "unsupported_grant_type"})
            with lock:
                token = "cc-%d" % (len(issued) + 1)
                issued[token] = time.time() + EXPIRES_IN
            return self.reply(200, {"access_token": token, "token_type": "Bearer",
                                    "expires_in": EXPIRES_IN})
        if self.path == "/revoke":
            with lock:
                revoked.add(fields["token"][0])
            return self.reply(200, {})
        if self.path == "/introspect":
            token = fields.get("token", [""])[0]
            with lock:
                user = None
                if token in revoked:
                    user = None
                elif token in issued and issued[token] > time.time():
                    user = APP_USER
                elif token.startswith("cmd-"):
                    user = token[4:]
            if user is None:
                return self.reply(200, {"active": False})
            return self.reply(200, {"active": True, "username": user})
        self.reply(404, {})


srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(PORTFILE + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os
os.rename(PORTFILE + ".tmp", PORTFILE)
srv.serve_forever()
