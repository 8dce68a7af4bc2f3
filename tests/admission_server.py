"""A mutating admission webhook served over HTTPS on 127.0.0.1, for tests against a real
kube-apiserver: it answers each AdmissionReview with the JSONPatch its `patch_for` gives and keeps
the reviews it was sent. (The operator's own webhook is tested as itself; this plays the others.)
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Patch = list[dict[str, Any]]


class PatchingWebhook(ThreadingHTTPServer):
    """`reviews` holds every AdmissionReview it was sent, in order."""

    def __init__(
        self, cert: Path | str, key: Path | str, patch_for: Callable[[dict[str, Any]], Patch]
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.patch_for = patch_for
        self.reviews: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/mutate"


class _Handler(BaseHTTPRequestHandler):
    server: PatchingWebhook

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.reviews.append(review)
        response = {
            "uid": review["request"]["uid"],
            "allowed": True,
            "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(self.server.patch_for(review)).encode()).decode(),
        }
        body = json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet


@contextmanager
def serving(server: PatchingWebhook) -> Iterator[PatchingWebhook]:
    """Serve `server` in a thread; shut it down and close it afterwards."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
