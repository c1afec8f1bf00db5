"""`semipd api`: the gateway's HTTP server (uvicorn) on its own listening socket."""

import signal
import socket
import sys

import uvicorn

from semipd.services.gateway.app import Gateway
from semipd.shared.errors import UserError

BACKLOG = 2048  # uvicorn's default
GRACE_S = 5  # on a signal, how long open answers may go on before they are cancelled (and aborted)


def listen(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn: a port in use is one clear error, and port 0 is told."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)  # now: a client that read the line below may connect before uvicorn runs
    except (OSError, OverflowError) as e:  # OverflowError: a port past 65535
        raise UserError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def run_gateway(address: str, host: str, port: int, api_key: str | None, served_model_name: str | None) -> None:
    sock = listen(host, port)
    app = Gateway(address, api_key, served_model_name).app()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=GRACE_S))
    bound_port = sock.getsockname()[1]
    print(f"semipd: OpenAI API at http://{host if ':' not in host else f'[{host}]'}:{bound_port}/v1 for the "
          f"server at {address}{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit 0 then, as serve does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(sockets=[sock])
