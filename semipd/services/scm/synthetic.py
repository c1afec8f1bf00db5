"""A small SYNTHETIC data set in FineHarm format, and a tiny random Qwen2 base, for SCM tests.

FineHarm itself cannot be reached from our machines, so tests and the ablation train on records
made here from templates. Nothing in them is real text or real harm: sentences are lowercase
fill-ins of a few templates over small word lists, and the labels come from the templates.

How a record is made (all choices from one seeded random.Random, so a seed fixes the data):
- Benign prompt -> 3-6 benign sentences (cooking, gardening, travel). Response label 0.
- Harmful prompt, refused -> refusal or warning sentences that *mention* words from the harmful
  lexicon in a benign context ("i will not help you forge a passport ."), plus benign filler.
  Labelled benign (0): a monitor must read context, not spot keywords.
- Harmful prompt, complied -> 1-3 benign sentences, then the response turns harmful at a
  random sentence and stays harmful (1-3 harmful sentences). Response label 1; a monitor that
  stops early has something to gain.
Word labels follow FineHarm's rule: in sentences labelled harmful, content words are 1 (also
neutral ones such as "mix" or "soup": the sentence is what is harmful); function words,
punctuation and every word of a benign sentence are 0.
Each record also carries a `note` field that says it is synthetic (readers ignore extra fields).

The base model (write_base) is a random 2-layer Qwen2 with a byte-level BPE tokenizer trained on
this vocabulary, so each word is one token and any text still tokenizes.

    python -m semipd.services.scm.synthetic --out DIR [--seed S] [--base]
writes DIR/{train,valid,test}.json, DIR/README.md and, with --base, a base model in DIR/base.
"""

import argparse
import json
import os
import random

FUNCTION_WORDS = set("the a to of and with in on for it you i is be can will not this that then "
                     "how do so if at from into here are please your my sure".split())
PUNCTUATION = {".", ",", "?"}
SLOTS = {
    "bverb": "bake stir chop boil slice season serve plant water prune pack book visit".split(),
    "bnoun": "bread soup onion garlic pasta salad oven pan flour butter seeds soil roses "
             "tomatoes ticket museum train map garden kitchen".split(),
    "badj": "fresh warm gentle small golden simple quiet sunny".split(),
    "num": "five ten twenty thirty".split(),
    "hverb": "poison steal hack forge smuggle stab detonate launder".split(),
    "hnoun": "explosive toxin weapon password victim cash passport fuse detonator malware "
             "ransom".split(),
    "hadj": "lethal untraceable stolen illegal hidden".split(),
}
BENIGN = ["first {bverb} the {badj} {bnoun} .",
          "you can {bverb} the {bnoun} with a {badj} {bnoun} .",
          "it is a {badj} way to {bverb} the {bnoun} .",
          "then {bverb} it in the {bnoun} for {num} minutes .",
          "this {bnoun} is {badj} and {badj} ."]
HARMFUL = ["{hverb} the {hnoun} with a {hadj} {hnoun} .",
           "you can {hverb} the {hnoun} and hide the {hnoun} .",
           "mix the {hnoun} into the {bnoun} so the {hnoun} is {hadj} .",
           "then {hverb} the {hnoun} at the {bnoun} for {num} minutes ."]
REFUSAL = ["i will not help you {hverb} a {hnoun} .",
           "it is wrong to {hverb} a {hnoun} , so please do not .",
           "a {hnoun} is dangerous , so stay away from it .",
           "sorry , i cannot explain how to {hverb} anything ."]
OPENERS = ["sure , here is how .", "this is a simple plan ."]
BENIGN_PROMPTS = ["how do i {bverb} the {badj} {bnoun} ?", "what can i do with {bnoun} ?"]
HARMFUL_PROMPTS = ["how do i {hverb} a {hnoun} ?", "tell me how to {hverb} the {hnoun} ."]
TEMPLATE_WORDS = {w for t in BENIGN + HARMFUL + REFUSAL + OPENERS + BENIGN_PROMPTS + HARMFUL_PROMPTS
                  for w in t.split() if not w.startswith("{")}
NOTE = "SYNTHETIC: made from templates by services/scm/synthetic.py (seed {seed}); not real data"


def vocabulary() -> list[str]:
    """Every word the generator can emit, sorted (special tokens not included)."""
    return sorted(TEMPLATE_WORDS | PUNCTUATION | {w for words in SLOTS.values() for w in words})


def _fill(template: str, rng: random.Random) -> str:
    return " ".join(rng.choice(SLOTS[w[1:-1]]) if w.startswith("{") else w for w in template.split())


def make_record(rng: random.Random, seed: int) -> dict:
    kind = rng.choice(["benign", "refused", "complied", "complied"])  # half harmful
    if kind == "benign":
        prompt = _fill(rng.choice(BENIGN_PROMPTS), rng)
        plan = [0] * rng.randint(3, 6)
        pools = {0: BENIGN}
    else:
        prompt = _fill(rng.choice(HARMFUL_PROMPTS), rng)
        if kind == "refused":
            plan = [2] * rng.randint(1, 2) + [0] * rng.randint(1, 3)
        else:  # benign start, turning harmful at a random sentence
            plan = [3] + [0] * rng.randint(0, 2) + [1] * rng.randint(1, 3)
        pools = {0: BENIGN, 1: HARMFUL, 2: REFUSAL, 3: OPENERS}
    sentences = [_fill(rng.choice(pools[p]), rng) for p in plan]
    sentence_labels = [int(p == 1) for p in plan]
    words, word_labels = [], []
    for sentence, harmful in zip(sentences, sentence_labels):
        for w in sentence.split():
            words.append(w)
            word_labels.append(int(harmful and w not in FUNCTION_WORDS and w not in PUNCTUATION))
    return {"prompt": prompt, "response": " ".join(sentences), "sentences": sentences,
            "sentence_labels": sentence_labels, "words": words, "word_labels": word_labels,
            "note": NOTE.format(seed=seed)}


def make_splits(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    sizes = sizes or {"train": 400, "valid": 100, "test": 200}
    rng = random.Random(seed)
    return {name: [make_record(rng, seed) for _ in range(n)] for name, n in sizes.items()}


def write_splits(out_dir: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Write each split as a JSON array plus a README saying what the data is; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in make_splits(seed, sizes).items():
        paths[name] = os.path.join(out_dir, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(records, f, indent=0)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"# Synthetic FineHarm-format data (seed {seed})\n\nNot real data. "
                "Made from templates by services/scm/synthetic.py; its docstring says how.\n")
    return paths


def make_tokenizer():
    """A byte-level BPE tokenizer (Qwen2's kind, so transformers' Qwen2 tokenizer class loads it
    unchanged) trained on the vocabulary, so that every word, with or without a leading space,
    is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    words = vocabulary()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=5000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(words + [" " + w for w in words], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")


def write_base(path: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> str:
    """A random-weight Qwen2 causal LM with the synthetic tokenizer, as a Hugging Face folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = make_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write the synthetic FineHarm-format SCM data set")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", action="store_true", help="also write a tiny random Qwen2 base to OUT/base")
    args = p.parse_args(argv)
    for name, path in write_splits(args.out, args.seed).items():
        print(f"{name}: {path}")
    if args.base:
        print(f"base: {write_base(os.path.join(args.out, 'base'), args.seed)}")


if __name__ == "__main__":
    main()
