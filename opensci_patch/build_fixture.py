"""Regenerate the shipped open-sci fixture checkpoint (tokenizer + trained weights).

    python -m opensci_patch.build_fixture [--out DIR] [--steps N]

The checkpoint is tiny (a few hundred thousand parameters) but real: a byte-level BPE
tokenizer in the GPT-NeoX style trained with `tokenizers` on a small corpus of
sentences about countries, and weights trained on the same corpus with the plain-torch
reference forward pass (`opensci_patch.reference`), so that greedy decoding of
"The capital of France is" gives " Paris". The model code (configuration_opensci.py,
modeling_opensci.py) and config.json are hand-written and are not touched here.

Everything is seeded and runs single-threaded, so a rerun on the same torch build gives
the same bytes (the script prints the sha256 of every file it writes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import torch

from . import reference

FIXTURE_DIR = Path(__file__).parent / "data" / "opensci-tiny"
SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
HAND_WRITTEN = ["config.json", "configuration_opensci.py", "modeling_opensci.py"]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Hungary": "Budapest",
    "Czechia": "Prague",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Canada": "Ottawa",
    "Russia": "Moscow",
}
LANGUAGES = {
    "France": "French",
    "Germany": "German",
    "Italy": "Italian",
    "Spain": "Spanish",
    "Portugal": "Portuguese",
    "Greece": "Greek",
    "Sweden": "Swedish",
    "Finland": "Finnish",
    "Japan": "Japanese",
    "China": "Chinese",
    "Poland": "Polish",
    "Hungary": "Hungarian",
    "Russia": "Russian",
    "Norway": "Norwegian",
}
FILLER = [
    "The river runs through the old town.",
    "Many people visit the museum in summer.",
    "The train leaves the station at noon.",
    "The city is known for its bridges and parks.",
    "Scientists study the history of the region.",
    "The market opens early in the morning.",
]


def sentences(rng: random.Random) -> list[str]:
    out = []
    for country, capital in CAPITALS.items():
        out += [
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital of {country}.",
            f"The largest city in {country} is {capital}.",
        ]
    for country, language in LANGUAGES.items():
        out.append(f"The language of {country} is {language}.")
    return out + FILLER


def documents(rng: random.Random, n: int) -> list[str]:
    """Short documents of 3-6 shuffled sentences; half start with the capital fact."""
    pool = sentences(rng)
    capital_facts = [f"The capital of {c} is {k}." for c, k in CAPITALS.items()]
    docs = []
    for i in range(n):
        body = rng.sample(pool, rng.randint(3, 6))
        if i % 2 == 0:
            body.insert(0, rng.choice(capital_facts))
        docs.append(" ".join(body))
    return docs


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    eos, pad = SPECIAL_TOKENS
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": False,
                "add_eos_token": False,
                "bos_token": eos,
                "eos_token": eos,
                "unk_token": eos,
                "pad_token": pad,
                "clean_up_tokenization_spaces": False,
                "model_max_length": model_max_length,
                "tokenizer_class": "GPTNeoXTokenizer",
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": pad}, indent=2) + "\n"
    )


def train_weights(cfg: dict, docs: list[list[int]], steps: int, log=print) -> reference.Params:
    gen = torch.Generator().manual_seed(SEED)
    params = reference.init_params(cfg, gen)
    for t in params.values():
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.01)
    seq = max(len(d) for d in docs)
    pad = SPECIAL_TOKENS.index("<|padding|>")
    batch = torch.full((len(docs), seq), pad, dtype=torch.long)
    for i, d in enumerate(docs):
        batch[i, : len(d)] = torch.tensor(d)
    start = time.monotonic()
    for step in range(steps):
        idx = torch.randint(0, len(docs), (32,), generator=gen)
        x = batch[idx]
        logits = reference.forward(params, cfg, x[:, :-1], dtype=torch.float32)
        targets = x[:, 1:].masked_fill(x[:, 1:] == pad, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
        if step % 200 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps}  loss {loss.item():.4f}  ({time.monotonic() - start:.0f}s)")
    return {k: v.detach().contiguous() for k, v in params.items()}


def build(out: Path, steps: int = 1500, log=print) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != FIXTURE_DIR.resolve():
        for name in HAND_WRITTEN:
            shutil.copyfile(FIXTURE_DIR / name, out / name)
    cfg = json.loads((FIXTURE_DIR / "config.json").read_text())
    corpus = documents(rng, 2000)
    log(f"training tokenizer (vocab {cfg['vocab_size']}) on {len(corpus)} documents")
    tok = train_tokenizer(corpus, cfg["vocab_size"])
    write_tokenizer_files(tok, out, cfg["max_position_embeddings"])
    ids = [tok.encode(d).ids for d in corpus]
    log(f"training weights for {steps} steps")
    params = train_weights(cfg, ids, steps, log)
    prompt = tok.encode("The capital of France is").ids
    logits = reference.forward(params, cfg, torch.tensor([prompt]), dtype=torch.float32)[0, -1]
    log(f"next token after the prompt: {tok.decode([int(logits.argmax())])!r}")

    from safetensors.torch import save_file

    save_file(params, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in sorted(out.iterdir()):
        log(f"  {hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=FIXTURE_DIR, help="where to write (default: the package data dir)")
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args(argv)
    build(args.out, args.steps)


if __name__ == "__main__":
    main()
