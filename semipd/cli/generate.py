"""`semipd generate`: run prompts in this process (no server) and print the outputs."""

from semipd.cli.args import (add_json_arg, add_model_args, add_prompt_args, add_sampling_args, print_completions,
                             sampling_params)
from semipd.shared.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="run prompts in this process and print the outputs")
    add_model_args(p)
    add_prompt_args(p)
    add_sampling_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    from semipd.shared.engine import Engine  # torch: only when the command runs
    from semipd.shared.engine_config import EngineConfig
    if not args.prompts:
        raise UserError("give at least one --prompt or --prompt-ids")
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 progress=not args.json))
    try:
        prompts = [engine.tokenizer.encode(v) if kind == "prompt" else v for kind, v in args.prompts]
        print_completions(engine.generate(prompts, sampling_params(args)), args)
    finally:
        engine.close()
