"""Flags and output shared by several `semipd` subcommands."""

import argparse
import json

from semipd.shared.client import ClientError, check_address
from semipd.shared.errors import UserError
from semipd.shared.runtime import default_server_address
from semipd.shared.sampling_params import SamplingParams


def prompt_ids(text: str) -> list[int]:
    """Token ids as 1,2,3: every item an integer (an empty one, as in 1,,2, is a typo)."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def server_address(text: str) -> str:
    """An argparse type: an ipc:// or tcp:// endpoint, its form checked before anything loads."""
    try:
        check_address(text)
    except ClientError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def utf8(text: str, flag: str) -> str:
    """text, or UserError if it is not UTF-8: Python hands on bytes of another encoding in
    arguments and input as lone surrogates, which no request can carry."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode(errors="surrogateescape").hex(" ")
        raise UserError(f"{flag} is not UTF-8 text (byte {bad} at character {e.start}); "
                        "convert it first, e.g. with iconv -t UTF-8") from None
    return text


def at_least(convert, lowest, what: str):
    """An argparse type: convert the text, then require lowest or more (NaN is not)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not value >= lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = at_least(int, 1, "a positive integer")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Both flags append (kind, value) to args.prompts, so prompts keep their command-line order."""
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   type=lambda text: ("prompt", text), help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", dest="prompts", action="append", metavar="IDS",
                   type=lambda text: ("prompt_ids", prompt_ids(text)),
                   help="prompt as comma-separated token ids (repeatable)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=16, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 or -1: off")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens of this much probability")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under this fraction of the likeliest's probability")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: one per request)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, one per line")


def prompts(args) -> list[tuple[str, str | list[int]]]:
    """args.prompts, (kind, value) each, once there is one and every text is UTF-8; --stop too."""
    if not args.prompts:
        raise UserError("give at least one --prompt or --prompt-ids")
    for kind, value in args.prompts:
        if kind == "prompt":
            utf8(value, "--prompt")
    for stop in args.stop:
        utf8(stop, "--stop")
    return args.prompts


def sampling_params(args):
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop, ignore_eos=args.ignore_eos)


def print_completions(completions, args, extra=None) -> None:
    for i, c in enumerate(completions):
        if args.json:
            obj = {"token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}
            print(json.dumps(obj | (extra[i] if extra else {})))
        else:
            print(f"[{i}] ({c.finish_reason}, {len(c.token_ids)} tokens) {c.text!r}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face directory, GGUF file or preset name")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", type=server_address, default=default_server_address(),
                   help="the server's ZeroMQ endpoint (ipc://PATH or tcp://HOST:PORT; default %(default)s)")


def add_client_args(p: argparse.ArgumentParser) -> None:
    """--address, and --timeout for a server that does not answer (a wrong tcp:// port, where
    ZeroMQ waits for a server to appear, a dead or stuck engine)."""
    add_address_arg(p)
    p.add_argument("--timeout", type=at_least(float, 0.1, "a number of seconds, 0.1 or more"), default=60,
                   metavar="SECONDS", help="give up when the server has said nothing for this long")
