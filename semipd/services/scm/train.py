"""`semipd scm-train`: fine-tune a Qwen2 backbone with the SCM's two heads (classifier.py) on
FineHarm-format data and save the checkpoint layout of checkpoint.py.

`--base` must be a Hugging Face Qwen2 folder with tokenizer files. Presets are refused: they
have no tokenizer files, and a random 0.5B model is no start for fine-tuning; for tests,
`python -m semipd.services.scm.synthetic --out DIR --base` writes a tiny random Qwen2 with a tokenizer
for the synthetic data. torch and transformers are imported only when training runs, so the
`semipd` command starts fast.
"""

import os
import random
from dataclasses import dataclass

from semipd.shared.errors import UserError


@dataclass
class TrainConfig:
    data: str
    base: str
    out: str
    epochs: int = 3
    batch_size: int = 8
    lr: float = 2e-5
    max_len: int = 1024
    token_weight: float = 0.6
    response_weight: float = 0.4
    logic_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def train(cfg: TrainConfig):
    """Train from cfg.base on cfg.data, save the SCM checkpoint to cfg.out, return the model."""
    import torch
    from tqdm import tqdm

    from semipd.services.scm import checkpoint
    from semipd.services.scm.classifier import (ScmClassifier, batches, load_backbone, load_tokenizer,
                                         resolve_device, scm_loss)
    from semipd.services.scm.fineharm import load_examples
    from semipd.shared.config import load_hf_config
    model_type = load_hf_config(cfg.base).model_type if os.path.isdir(cfg.base) else None
    if model_type != "qwen2":
        found = f"a {model_type!r} model" if model_type else "not a folder; presets have no tokenizer files"
        raise UserError(f"--base {cfg.base}: must be a Hugging Face Qwen2 folder with tokenizer "
                        f"files ({found}); `python -m semipd.services.scm.synthetic --base` writes a tiny one")
    tokenizer = load_tokenizer(cfg.base)
    examples = load_examples(cfg.data, tokenizer, cfg.max_len)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = ScmClassifier(load_backbone(cfg.base)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # linear decay to 0
    rng = random.Random(cfg.seed)
    bar = tqdm(total=steps, desc="scm-train", unit="step", disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        for batch in batches(examples, cfg.batch_size, device, rng):
            loss = scm_loss(net, batch, cfg.token_weight, cfg.response_weight, cfg.logic_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            bar.update(1)
    bar.close()
    net.eval()
    checkpoint.save_checkpoint(cfg.out, net.model, net.heads(), net.model.config, tokenizer)
    return net


def cmd_scm_train(args) -> None:
    if args.epochs < 1 or args.batch_size < 1 or args.max_len < 2 or args.lr <= 0:
        raise UserError("--epochs, --batch-size and --lr must be positive, --max-len at least 2")
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}))
    print(f"saved SCM checkpoint to {args.out}")


def add_parser(sub) -> None:
    d = TrainConfig("", "", "")
    p = sub.add_parser("scm-train", help="train a streaming content monitor on FineHarm-format data")
    p.add_argument("--data", required=True, help="FineHarm-format JSON (array or JSON Lines)")
    p.add_argument("--base", required=True, help="Hugging Face Qwen2 folder to start from")
    p.add_argument("--out", required=True, help="folder for the SCM checkpoint")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-len", type=int, default=d.max_len, help="tokens per example (the end is cut)")
    p.add_argument("--token-weight", type=float, default=d.token_weight)
    p.add_argument("--response-weight", type=float, default=d.response_weight)
    p.add_argument("--logic-weight", type=float, default=d.logic_weight, help="0 turns the logic loss off")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_scm_train)
