"""`semipd chat`: a conversation with a running server's model, one user turn per line of input.

The server renders the whole conversation with the model's chat template at every turn, so each
request carries every earlier turn, the model's answers included."""

import sys
from dataclasses import asdict

from semipd.cli.args import add_client_args, add_sampling_args, sampling_params, utf8
from semipd.shared.client import Client, ClientError
from semipd.shared.errors import UserError, first_line

EXIT = "/exit"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="talk with a running server's model, one turn per line (its chat template "
                                    "renders the conversation); ends at end of input or /exit")
    add_client_args(p)
    add_sampling_args(p)
    p.set_defaults(max_tokens=None)  # an answer ends at the end of its turn, or when the context is full
    p.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--usage", action="store_true",
                   help="after each answer, print its prompt and answer token counts to stderr")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> None:
    params = asdict(sampling_params(args))
    if params["max_tokens"] is None:
        del params["max_tokens"]
    messages = [{"role": "system", "content": utf8(args.system, "--system")}] if args.system else []
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach utf8(), not a traceback
    try:
        with Client(args.address, args.timeout) as client:
            while (turn := read_turn()) is not None:
                messages.append({"role": "user", "content": turn})
                messages.append({"role": "assistant", "content": answer(client, messages, params, args.usage)})
    except ClientError as e:
        raise UserError(first_line(e)) from None


def read_turn() -> str | None:
    """The next user turn: a line of input (after a prompt on a terminal); None at end of input
    or /exit. Blank lines are skipped."""
    while True:
        if sys.stdin.isatty():
            try:
                line = input("> ")
            except EOFError:
                print()
                return None
        else:
            line = sys.stdin.readline()
            if not line:
                return None
        line = utf8(line.strip(), "a line of input")
        if line == EXIT:
            return None
        if line:
            return line


def answer(client: Client, messages: list[dict], params: dict, usage: bool) -> str:
    """Stream the model's answer to stdout as it comes; return its text."""
    with client.chat(messages, **params) as stream:
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        result = stream.result()
    sys.stdout.write("\n")
    sys.stdout.flush()
    final = result.final
    if final.finish_reason != "stop":
        print(f"semipd: the answer ended early ({final.finish_reason})", file=sys.stderr)
    if usage:
        print(f"semipd: usage: {final.prompt_tokens} prompt tokens, {final.completion_tokens} answer tokens",
              file=sys.stderr)
    return result.text
