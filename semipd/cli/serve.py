"""`semipd serve`: the controller with its workers (services/controller/serve.py runs it)."""

import argparse

from semipd.cli.args import add_model_args, at_least, positive_int, server_address
from semipd.services.controller.moderation import add_moderation_args, moderation_config
from semipd.services.controller.modes import add_mode_args, mode_from_args
from semipd.shared.config import check_model
from semipd.shared.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the controller with its prefill and decode workers")
    add_model_args(p)
    p.add_argument("--num-pages", type=positive_int, default=None,
                   help="KV pool size in pages (default: what fits)")
    p.add_argument("--page-size", type=positive_int, default=16,
                   help="tokens per KV page (default %(default)s)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256,
                   help="most sequences in a batch (default %(default)s)")
    p.add_argument("--max-batched-tokens", "--max-num-batched-tokens", type=positive_int, default=8192,
                   help="most tokens one prefill or unified step computes; longer prompts are computed "
                        "in chunks (default %(default)s; vLLM's --max-num-batched-tokens)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="most prompt and output tokens together (default and cap: the model's context length)")
    p.add_argument("-tp", "--tensor-parallel-size", type=positive_int, default=1,
                   help="GPUs (CPU: processes) per worker, the model sharded across them (default %(default)s)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt in full: keep no computed pages for later prompts")
    p.add_argument("--address", type=server_address, default=None,
                   help="client socket (default: an ipc:// path in the runtime folder; tcp://127.0.0.1:PORT)")
    p.add_argument("--http", type=host_port, metavar="HOST:PORT", default=None,
                   help="also serve OpenAI's HTTP API there (`semipd api` as a child process)")
    p.add_argument("--drain-timeout", type=at_least(float, 0, "a number of seconds, 0 or more"), default=0,
                   metavar="S", help="on SIGTERM or Ctrl-C, admit no new requests and let those in flight "
                   "finish for up to S seconds before ending the rest (default %(default)s: end them at once)")
    add_moderation_args(p)
    add_mode_args(p)
    p.set_defaults(func=cmd_serve)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def cmd_serve(args) -> None:
    # What a user may have mistyped fails here, in well under a second, not after torch and
    # the weights have loaded; serve() builds the mode and the monitor's config anew.
    check_model(args.model)
    if args.mode == "unified" and args.max_batched_tokens < args.max_num_seqs:
        # a unified step holds a token of each running sequence first: prefill would starve
        raise UserError(f"--mode unified needs --max-batched-tokens ({args.max_batched_tokens}) at least "
                        f"--max-num-seqs ({args.max_num_seqs})")
    mode_from_args(args)
    moderation_config(args)
    from semipd.services.controller.serve import serve  # torch: only when the command runs
    serve(args)
