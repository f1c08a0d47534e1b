"""A CLIP tokenizer built on this machine, and placeholder tokens for textual-inversion-style methods.

transformers 5.x ignores ``CLIPTokenizer(vocab_file=...)``; the tokenizer is built from a vocabulary dict and a
merges list instead. The vocabulary is CLIP's byte-level alphabet (so any text encodes) plus whole-word tokens for
the words the toolkit's captions and methods use, so that "bottle" or "defect" is one token as in CLIP.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..data.synthetic import DEFECT_TYPES, PRODUCTS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that must be single tokens: captions of the mini prior, the initialiser words of the methods
# (SeaS: "object", "defect"), and the MVTec / VisA product and defect vocabulary for real-data prompts.
CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "of", "with", "that", "is", "and", "on", "in", "damaged", "defect", "defective",
    "object", "good", "normal", "anomaly", "anomalous", "broken", "flawless", "perfect", "surface", "texture",
    "product", "industrial", "close", "up", "top", "view", "small", "large", "part", "some", "no",
)
PRODUCT_WORDS: tuple[str, ...] = tuple(sorted({w for p in PRODUCTS for w in p.split("_")} | {
    "bottle", "metal", "nut", "pill", "screw", "cable", "transistor", "capsule", "hazelnut", "carpet", "grid",
    "leather", "wood", "tile", "toothbrush", "zipper", "candle", "cashew", "chewinggum", "fryum", "macaroni",
    "pcb", "pipe", "bagel", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire", "breakfast", "box",
    "juice", "pushpins", "screw", "bag", "splicing", "connectors"}))
DEFECT_WORDS: tuple[str, ...] = tuple(sorted(set(DEFECT_TYPES) | {
    "scratches", "cracks", "holes", "stains", "contaminated", "missing", "bent", "cut", "color", "colour", "poke",
    "glue", "fold", "print", "squeeze", "thread", "liquid", "rough", "faulty", "imprint", "misplaced", "flip",
    "manipulated", "front", "fabric", "border", "interior", "combined", "swap", "split", "burnt", "chip", "spot",
    "dent", "wire", "insulation", "lead", "oil", "gray", "metal", "hole", "crack", "scratch", "stain"}))
DEFAULT_WORDS: tuple[str, ...] = tuple(dict.fromkeys(CAPTION_WORDS + PRODUCT_WORDS + DEFECT_WORDS))


def byte_alphabet() -> list[str]:
    """CLIP / GPT-2 byte-level alphabet: one printable unicode character per byte value (256, fixed order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the byte alphabet plus every word in ``words`` as one token.

    Merges build each word left to right; where an earlier word's merge pre-empts that chain, a merge joining the
    pieces actually produced is appended, until every word encodes to exactly one token.
    """
    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    merge_set: set[tuple[str, str]] = set()

    def add_merge(a: str, b: str) -> None:
        if (a, b) not in merge_set:
            merge_set.add((a, b))
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))

    words = [w.lower() for w in dict.fromkeys(words) if w]
    for w in words:
        if not w.isalpha() or not w.isascii():
            raise ValueError(f"Tokenizer words must be plain ASCII letters (CLIP splits digits and symbols): '{w}'.")
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        piece = symbols[0]
        for s in symbols[1:]:
            add_merge(piece, s)
            piece += s
    for _ in range(8):
        tok = _make(vocab, merges, model_max_length)
        broken = [(w, tok.tokenize(w)) for w in words if len(tok.tokenize(w)) != 1]
        if not broken:
            return tok
        for _, pieces in broken:
            acc = pieces[0]
            for p in pieces[1:]:
                add_merge(acc, p)
                acc += p
    raise RuntimeError(f"Could not make single tokens of: {[w for w, _ in broken]}")


def _make(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int) -> CLIPTokenizer:
    full = dict(vocab)
    for special in (BOS, EOS):
        full.setdefault(special, len(full))
    return CLIPTokenizer(vocab=full, merges=list(merges), model_max_length=model_max_length)


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, model_max_length), padded and truncated as Stable Diffusion does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def token_runs(tokenizer, prompt: str, words: str) -> list[range]:
    """Each place where the tokens of ``words`` occur as a contiguous run in the tokenized ``prompt`` (truncated as
    the text encoder sees it; start token at 0), as a range of token positions; empty ``words``: none."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(words, add_special_tokens=False).input_ids
    return [range(i, i + len(sub)) for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]


def add_placeholder_tokens(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: Sequence[str],
                           init_word: str | None = None) -> list[int]:
    """Add ``tokens`` to the vocabulary and embedding table; new rows start from ``init_word``'s embedding.

    Returns the new token ids. ``init_word`` must encode to tokens already in the vocabulary; its token
    embeddings are averaged (one token for the toolkit's words, as in CLIP). Without it the rows keep the
    random initialisation of ``resize_token_embeddings``.
    """
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"Placeholder tokens already in the vocabulary: {clash}. Choose other names.")
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise ValueError(f"Only {added} of {len(tokens)} placeholder tokens were added (duplicates in {list(tokens)}?).")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    text_encoder.resize_token_embeddings(len(tokenizer))
    if init_word is not None:
        init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise ValueError(f"Initialiser word '{init_word}' encodes to no tokens.")
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids] = table[init_ids].mean(0, keepdim=True)
    return ids
