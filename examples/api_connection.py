"""How the examples reach the backend WebSocket API: the URL, and credentials when the cluster has users.

`add_options(parser)` adds `--api` and `--user`; `connect(args)` opens the
connection, sending HTTP basic credentials when `--user` is given: the
password comes from the environment variable MESHGATE_PASSWORD, or is asked
on the terminal. Only tornado is needed.
"""

import base64
import getpass
import os

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


def add_options(parser) -> None:
    parser.add_argument("--api", default="ws://127.0.0.1:6789/ws/v1", help="backend WebSocket API URL")
    parser.add_argument("--user", help="API user (access.users); password from MESHGATE_PASSWORD or asked")


def headers(user) -> dict:
    if not user:
        return {}
    password = os.environ.get("MESHGATE_PASSWORD")
    if password is None:
        password = getpass.getpass(f"password for {user}: ")
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def connect(args):
    return await websocket_connect(HTTPRequest(args.api, headers=headers(args.user)))
