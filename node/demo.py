"""The chat demo page a client server can serve (option `demo`): one self-contained HTML file.

The page connects back over WebSocket to its server's path and speaks the
protocol of conf/entries/chat.py. No CDN, no build step.
"""

import functools
import os

import tornado.web

_PAGE = os.path.join(os.path.dirname(__file__), "static", "demo.html")


@functools.lru_cache(maxsize=8)
def page_for(ws_path: str) -> str:
    """The page, pointed at the WebSocket server at `ws_path` (read once per path)."""
    with open(_PAGE, encoding="utf-8") as handle:
        return handle.read().replace("__MESHGATE_WS_PATH__", ws_path)


class DemoHandler(tornado.web.RequestHandler):
    def initialize(self, ws_path: str):
        self.page = page_for(ws_path)

    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(self.page)
