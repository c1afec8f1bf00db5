"""`semipd api`: the OpenAI-compatible HTTP gateway in front of a running server
(services/gateway runs it)."""

import os

from semipd.cli.args import add_address_arg, at_least


def add_parser(sub) -> None:
    p = sub.add_parser("api", help="serve OpenAI's completions and chat API over HTTP in front of a running server")
    add_address_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default %(default)s, this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=at_least(int, 0, "a port number"), default=8000,
                   help="TCP port (default %(default)s; 0 picks a free one, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("SEMIPD_API_KEY"),
                   help="require the header Authorization: Bearer KEY on /v1 (default $SEMIPD_API_KEY, "
                        "which keeps the key off the command line; unset: no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the server's --model)")
    p.set_defaults(func=cmd_api)


def cmd_api(args) -> None:
    from semipd.services.gateway.server import run_gateway  # uvicorn and starlette: only when it runs
    run_gateway(args.address, args.host, args.port, args.api_key or None, args.served_model_name)
