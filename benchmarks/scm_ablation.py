"""Ablation of the SCM's logic loss on the synthetic FineHarm-format set (runs on a CPU).

    python -m benchmarks.scm_ablation [--sizes 25,50,100,400] [--seeds 0,1,2] [--epochs 5]

For each training-set size and seed: write the synthetic splits and a tiny random Qwen2 base
(semipd/services/scm/synthetic.py), train twice from the same start, with the logic loss
(--logic-weight 1) and without (0), and score the same 200-record test split at threshold 0.6,
k 4. Prints per-run rows and the mean over seeds: macro F1 of the streaming rule, macro F1 of
the response head, and the mean fraction of response tokens seen before a stop.
"""

import argparse
import os
import tempfile

from semipd.services.scm.classifier import load_tokenizer
from semipd.services.scm.evaluate import evaluate, score
from semipd.services.scm.fineharm import load_examples
from semipd.services.scm.synthetic import write_base, write_splits
from semipd.services.scm.train import TrainConfig, train

TEST_SIZE = 200


def run(size: int, seed: int, logic_weight: float, epochs: int, root: str):
    data = write_splits(os.path.join(root, f"data-{size}-{seed}"), seed, {"train": size, "test": TEST_SIZE})
    base = write_base(os.path.join(root, f"base-{seed}"), seed)
    net = train(TrainConfig(data=data["train"], base=base, out=os.path.join(root, "ckpt"),
                            epochs=epochs, batch_size=16, lr=1e-3, logic_weight=logic_weight,
                            seed=seed, progress=False))
    examples = load_examples(data["test"], load_tokenizer(base), 1024)
    return evaluate(score(net, examples), 0.6, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="25,50,100,400", help="training records")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'train':>5} {'seed':>4} {'logic':>5} {'macroF1':>8} {'headF1':>7} {'seen':>6}")
    with tempfile.TemporaryDirectory() as root:
        for size in sizes:
            means = {}
            for weight in (1.0, 0.0):
                results = [run(size, seed, weight, args.epochs, root) for seed in seeds]
                for seed, r in zip(seeds, results):
                    print(f"{size:>5} {seed:>4} {weight:>5g} {r.macro_f1:>8.4f} "
                          f"{r.response_head_macro_f1:>7.4f} {r.mean_fraction_seen:>6.3f}")
                means[weight] = [sum(getattr(r, f) for r in results) / len(results)
                                 for f in ("macro_f1", "response_head_macro_f1", "mean_fraction_seen")]
            for weight, (f1, head, seen) in means.items():
                print(f"{size:>5} mean {weight:>5g} {f1:>8.4f} {head:>7.4f} {seen:>6.3f}")


if __name__ == "__main__":
    main()
