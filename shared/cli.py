"""The `semipd` command. Each subcommand lives with the code it drives; this file parses."""

import argparse
import json
import os
import sys

from shared.errors import UserError


def prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


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
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 or -1: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, one per line")


def sampling_params(args):
    from shared.sampling_params import SamplingParams
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


def cmd_generate(args) -> None:
    from shared.engine import Engine, EngineConfig
    if not args.prompts:
        raise UserError("give at least one --prompt or --prompt-ids")
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 progress=not args.json))
    try:
        prompts = [engine.tokenizer.encode(v) if kind == "prompt" else v for kind, v in args.prompts]
        print_completions(engine.generate(prompts, sampling_params(args)), args)
    finally:
        engine.close()


def add_serve_args(p) -> None:
    p.add_argument("--model", required=True, help="Hugging Face directory or preset name")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-pages", type=positive_int, default=None,
                   help="KV pool size in pages (default: what fits)")
    p.add_argument("--page-size", type=positive_int, default=16,
                   help="tokens per KV page (default %(default)s)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256,
                   help="most sequences in a batch (default %(default)s)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="most prompt and output tokens together (default and cap: the model's context length)")


def cmd_serve(args) -> None:
    from services.controller.serve import serve
    serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semipd", description="semi-PD LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run prompts in this process and print the outputs")
    gen.add_argument("--model", required=True, help="Hugging Face directory or preset name")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_prompt_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="run the controller with its prefill and decode workers")
    add_serve_args(serve)
    serve.add_argument("--address", default=None,
                       help="client socket (default: an ipc:// path in the runtime folder; tcp://127.0.0.1:PORT)")
    from services.controller.moderation import add_moderation_args
    from services.controller.modes import add_mode_args
    add_moderation_args(serve)
    add_mode_args(serve)
    serve.set_defaults(func=cmd_serve)
    from shared import bench, client_cli  # here: they import this module's helpers
    client_cli.add_parsers(sub)
    bench.add_parser(sub)
    from services.scm import evaluate as scm_eval, train as scm_train
    scm_train.add_parser(sub)
    scm_eval.add_parser(sub)
    from services.scm import cli as scm_cli
    scm_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe raises below and not at exit
    except UserError as e:
        print(f"semipd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`semipd stats | head -1`): no traceback, but status 1 as a
        # tool killed by SIGPIPE fails, since not all output was written (it shows only under
        # pipefail). Python flushes stdout again at exit: point it at devnull so that cannot raise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
