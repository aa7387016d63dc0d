"""A stand-in for the kubelet's read-only pod API: `GET /pods` answers with the content of a
JSON file the test rewrites (a core/v1 PodList, as the kubelet serves it), after checking the
bearer token. The content `FAIL` makes it answer 500, as a kubelet in trouble does.

Usage: fake_kubelet.py PODS_FILE TOKEN [CERT KEY]   (with CERT and KEY: HTTPS)
Prints `LISTEN PORT` once it listens on 127.0.0.1.
"""

import http.server
import ssl
import sys

PODS, TOKEN = sys.argv[1], sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/pods":
            return self.answer(404, b"not found")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.answer(401, b"Unauthorized")
        with open(PODS, "rb") as f:
            body = f.read()
        if body.startswith(b"FAIL"):
            return self.answer(500, b"internal error")
        self.answer(200, body, "application/json")

    def answer(self, status, body, kind="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 4:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(f"LISTEN {server.server_address[1]}", flush=True)
server.serve_forever()
