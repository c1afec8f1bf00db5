"""The `semipd scm` command line (torch-free: the parser is built for every semipd command)."""

from semipd.shared.runtime import default_monitor_address


def add_parser(sub) -> None:
    p = sub.add_parser("scm", help="run the streaming content monitor that `semipd serve --scm` talks to")
    p.add_argument("--model", required=True,
                   help="SCM checkpoint folder, or a preset with random weights (scm-tiny, scm-qwen2.5-0.5b)")
    p.add_argument("--address", default=default_monitor_address(),
                   help="socket to serve on (default: %(default)s; tcp://127.0.0.1:PORT)")
    p.add_argument("--threshold", type=float, default=0.6, help="a token counts as harmful at P >= this")
    p.add_argument("--k", type=int, default=4, help="stop a response at its k-th harmful token")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-streams", type=int, default=128, help="responses watched at once")
    p.add_argument("--max-model-len", type=int, default=4096, help="longest prompt + response watched, in tokens")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pool size (default: max-streams full-length streams)")
    p.add_argument("--max-batched-tokens", type=int, default=4096, help="tokens computed per step at most")
    p.add_argument("--step-interval-ms", type=float, default=0.0,
                   help="start a step at most this often: fewer, larger steps read the monitor's weights "
                        "less often (less cost to the served model on a shared GPU) for a longer verdict lag")
    p.set_defaults(func=cmd_scm)


def cmd_scm(args) -> None:
    from semipd.services.scm.service import run
    run(args)
