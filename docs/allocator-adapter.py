#!/usr/bin/env python3
"""A reference adapter for `allocator.kind: http` (README.md, "Where new references come from").

smtpgate POSTs {"source_reference", "mailbox", "team", "subject", "from", "message_id"} with
"Authorization: Bearer <token>" and needs 200/201 {"reference": "..."} within allocator.timeout.
Replace create_activity with the call that creates the linked activity in your work-management
system. Standard library only. Run:
    ALLOCATOR_TOKEN_FILE=/etc/smtpgate/allocator.token python3 allocator-adapter.py 127.0.0.1 8025
"""
import hmac, itertools, json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = open(os.environ["ALLOCATOR_TOKEN_FILE"], encoding="utf-8").read().strip()
numbers, made, lock = itertools.count(700000), {}, threading.Lock()


def create_activity(request: dict) -> str:
    """The reference of the activity linked to request["source_reference"] for request["mailbox"].
    Idempotent: smtpgate calls again when a client retries after a timeout."""
    key = (request["source_reference"], request["mailbox"])
    with lock:
        if key not in made:
            made[key] = f"{next(numbers)}-T"  # your system's "create linked activity" call goes here
        return made[key]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {TOKEN}"):
            return self.answer(401, {"error": "bad bearer token"})
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            return self.answer(201, {"reference": create_activity(request)})
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"error": "expected smtpgate's allocation request"})

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
print("listening on %s:%d" % server.server_address[:2], flush=True)
server.serve_forever()
