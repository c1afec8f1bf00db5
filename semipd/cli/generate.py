"""`semipd generate`: run prompts in this process (no server) and print the outputs."""

from semipd.cli.args import (add_json_arg, add_model_args, add_prompt_args, add_sampling_args, print_completions,
                             prompts, sampling_params)
from semipd.shared.config import check_model


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="run prompts in this process and print the outputs")
    add_model_args(p)
    add_prompt_args(p)
    add_sampling_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    texts = prompts(args)
    check_model(args.model)
    from semipd.shared.engine import Engine  # torch: only when the command runs
    from semipd.shared.engine_config import EngineConfig
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 progress=not args.json))
    try:
        ids = [engine.tokenizer.encode(v) if kind == "prompt" else v for kind, v in texts]
        print_completions(engine.generate(ids, sampling_params(args)), args)
    finally:
        engine.close()
