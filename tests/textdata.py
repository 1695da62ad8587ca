"""Small real-text corpora and tokenizers shared by the data tests (cached per test process)."""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from trainer.data import pydocs

# Real prose nobody here wrote: the docstrings of a few standard-library modules (~150k characters).
_MODULES = ("argparse.py", "csv.py", "json/__init__.py", "pathlib.py", "shutil.py", "textwrap.py", "zipfile.py")

UNICODE_DOC = ("Ça coûte 5 € ou 4 £ — naïve café, Zürich, Ångström, Øresund, ﬁn.\n"
               "\t中文字符 日本語のテキスト 한국어 😀👍🏽🇫🇷👩‍👩‍👧\n"
               "  two  spaces   three\r\n\n\nend ▁ \ue000\ue001 \u00a0\u3000\u200b\ufeff \x00\x07 ∑∫√∞")


@functools.lru_cache(maxsize=None)
def documents() -> tuple[str, ...]:
    """Paragraphs of real docstrings, in a fixed order."""
    docs = []
    for name in _MODULES:
        docs += [p for p in pydocs.module_document(pydocs.stdlib_dir() / name).split("\n\n") if p.strip()]
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def tokenizer(model_type: str = "bpe", vocab_size: int = 400):
    from trainer.data.subword import train_tokenizer

    return train_tokenizer(documents(), model_type=model_type, vocab_size=vocab_size)


def write_jsonl(path: Path, docs, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`",
    " \t\n\r\x0b\x0c  ",
    "".join(map(chr, range(0, 32))) + "\x7f",
    "éèêëàâäôöûüçñÅåøæœßÉÑ\u0301\u0308",
    "€£¥©®™°±§¶•…–—‘’“”«»",
    "▁\ue000\ue001\ufeff\u200b\u2028\u00a0\u3000",
]
_RANGES = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0590, 0x06FF),
           (0x0900, 0x097F), (0x10000, 0x10FFFF)]


def random_string(rng: random.Random, max_len: int = 40) -> str:
    """A random string mixing scripts, emoji, whitespace runs, control characters and SentencePiece's own
    meta-symbols, plus any code point at all (surrogates excluded: UTF-8 cannot encode them)."""
    out = []
    for _ in range(rng.randint(0, max_len)):
        kind = rng.random()
        if kind < 0.5:
            out.append(rng.choice(rng.choice(_POOLS)))
        elif kind < 0.6:
            out.append(" " * rng.randint(2, 6))
        else:
            cp = rng.randint(*rng.choice(_RANGES))
            out.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else cp + 0x800))
    return "".join(out)


def prepare_small(out: Path, docs=None, *, val_fraction: float = 0.1, shard_tokens: int = 997) -> Path:
    """A prepared directory of `docs` (default: the real docstrings) with the 400-piece BPE tokenizer, in
    shards of `shard_tokens` (997: training sequences span shards)."""
    from trainer.data.prepare import PrepareSpec, prepare

    out.parent.mkdir(parents=True, exist_ok=True)
    model = out.parent / f"{out.name}.tok.model"
    tokenizer("bpe", 400).save(model)
    corpus = write_jsonl(out.parent / f"{out.name}.jsonl", documents() if docs is None else docs)
    prepare(PrepareSpec(out=out, inputs=[str(corpus)], tokenizer_model=str(model), shard_tokens=shard_tokens,
                        val_fraction=val_fraction, workers=1, progress=False))
    return out
