"""A local HTTP server that speaks Ollama's /api/tags, /api/show and /api/chat (streaming off)
with the real server's request and response bodies, so that the code under test is the real
``ollama`` client. The Ollama server itself cannot be installed here (design.md)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[dict], tuple[int, dict] | str]


@dataclass
class FakeOllama:
    """``replies``: what each /api/chat answers in turn: the assistant's content, or a function
    of the request returning (status, body) or content. ``delay_s`` delays every chat."""

    models: list[str] = field(default_factory=lambda: ["llama3.1:8b"])
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    replies: list[Reply] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[dict] = field(default_factory=list)
    raw_bodies: list[bytes] = field(default_factory=list)

    def start(self) -> FakeOllama:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/api/tags":
                    self._reply(200, {"models": [
                        {"name": m, "model": m, "modified_at": "2026-11-01T10:00:00Z",
                         "size": 4920753328, "digest": "a" * 64,
                         "details": {"format": "gguf", "family": "llama",
                                     "parameter_size": "8.0B",
                                     "quantization_level": "Q4_K_M"}}
                        for m in fake.models]})
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                if self.path == "/api/show":
                    if body.get("model") not in fake.models:
                        self._reply(404, {"error": f"model '{body.get('model')}' not found"})
                        return
                    self._reply(200, {"modelfile": "", "parameters": "", "template": "",
                                      "details": {"format": "gguf", "family": "llama"},
                                      "model_info": {}, "capabilities": fake.capabilities,
                                      "modified_at": "2026-11-01T10:00:00Z"})
                elif self.path == "/api/chat":
                    fake.requests.append(body)
                    fake.raw_bodies.append(raw)
                    if fake.delay_s:
                        time.sleep(fake.delay_s)
                    if body.get("model") not in fake.models:
                        self._reply(404, {"error": f"model '{body.get('model')}' not found, "
                                                   "try pulling it first"})
                        return
                    reply = fake.replies.pop(0) if fake.replies else "{}"
                    result = reply(body) if callable(reply) else reply
                    if isinstance(result, tuple):
                        self._reply(*result)
                        return
                    self._reply(200, {
                        "model": body["model"], "created_at": "2026-11-22T10:00:00Z",
                        "message": {"role": "assistant", "content": result},
                        "done_reason": "stop", "done": True, "total_duration": 1_000_000,
                        "load_duration": 1000, "prompt_eval_count": 10,
                        "prompt_eval_duration": 1000, "eval_count": 10,
                        "eval_duration": 1000})
                else:
                    self._reply(404, {"error": "not found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(**sections: Any) -> str:
    """An assistant message in the narrative schema."""
    body = {"impression": "", "lesions": [], "comparison": "", "recommendation": "",
            "limitations": ""}
    body.update(sections)
    return json.dumps(body)
