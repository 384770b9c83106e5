"""IOI-style prompts (indirect object identification, Wang et al. 2022; guide Resource 10).

``rows`` is a data generator: text rows with the name roles IO (the indirect object), S1/S2 (the
subject, twice) and the token positions of each, the IO and S names as metric targets, and an ABC
counterfactual (``cf_text``: the same story told with three different names, from a template
drawn independently, so it may have another length) with the positions of its own roles.
Positions are word indices, which are token indices under the word-level tokenizer that
``tokenizer`` trains on the generated text (offline, with the ``tokenizers`` library); with
``data.prepend_bos: true`` pass ``bos: true`` so they count the BOS token too.

    data:
      generator: mi_spec.zoo.ioi:rows
      params: {n: 64, seed: 0}
      text: text
      tokenizer: mi_spec.zoo.ioi:tokenizer   # or a folder written by train_tokenizer
      positions:
        S2: {column: s2_pos, counterfactual: cf_s2_pos}
        IO: {column: io_pos, counterfactual: cf_io_pos}
        end: -1
    metric: {kind: logit_diff, at: end, target: io, wrong: s}
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

NAMES = [
    "Mary", "John", "Tom", "James", "Anna", "Kate", "Paul", "Lisa",
    "Mark", "Sara", "Eric", "Jane", "Adam", "Emma", "Carl", "Rose",
]  # fmt: skip
OBJECTS = ["drink", "book", "ring", "letter", "bone", "kiss", "basketball", "necklace"]
PLACES = ["store", "park", "school", "garden", "office", "station", "restaurant"]
# {A} {B}: the two names of the first clause (IO and S1 in either order), {S}: S2, then the IO
# completes the prompt. Templates differ in length, so prompts of one dataset differ too.
TEMPLATES = [
    "When {A} and {B} went to the {place} , {S} gave a {obj} to",
    "Then , {A} and {B} went to the {place} . {S} gave a {obj} to",
    "After {A} and {B} spent a long day at the {place} , {S} handed a {obj} to",
    "{A} and {B} had a {obj} at the {place} . {S} gave it to",
    "While {A} and {B} were working at the {place} , {S} quietly gave a {obj} to",
    "Friends {A} and {B} found a {obj} at the {place} . {S} gave it to",
]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]"]


def rows(n: int = 64, seed: int = 0, bos: bool = False) -> list[dict[str, Any]]:
    """``n`` IOI prompts with roles and an ABC counterfactual (deterministic for ``seed``).
    ``bos``: positions count a BOS token before the text (``data.prepend_bos: true``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        io, s, c1, c2, c3 = rng.sample(NAMES, 5)
        base = _prompt(rng, io, s, s, int(bos))
        cf = _prompt(rng, c1, c2, c3, int(bos))  # ABC: the third name is neither of the first two
        out.append(
            {
                "text": base["text"],
                "io": io,
                "s": s,
                "io_pos": base["io_pos"],
                "s1_pos": base["s1_pos"],
                "s2_pos": base["s2_pos"],
                "cf_text": cf["text"],
                "cf_io_pos": cf["io_pos"],
                "cf_s1_pos": cf["s1_pos"],
                "cf_s2_pos": cf["s2_pos"],
            }
        )
    return out


def _prompt(rng: random.Random, io: str, s1: str, s2: str, offset: int) -> dict[str, Any]:
    template = rng.choice(TEMPLATES)
    io_first = rng.random() < 0.5
    a, b = (io, s1) if io_first else (s1, io)
    words = template.format(
        A=a, B=b, S=s2, place=rng.choice(PLACES), obj=rng.choice(OBJECTS)
    ).split()
    slots = [i + offset for i, w in enumerate(template.split()) if w in ("{A}", "{B}", "{S}")]
    io_pos, s1_pos = (slots[0], slots[1]) if io_first else (slots[1], slots[0])
    return {"text": " ".join(words), "io_pos": io_pos, "s1_pos": s1_pos, "s2_pos": slots[2]}


def corpus() -> list[str]:
    """Every word the templates and names can produce (what the tokenizer is trained on)."""
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    return [" ".join(sorted(words)), " ".join(NAMES), " ".join(OBJECTS), " ".join(PLACES)]


def tokenizer() -> Any:
    """A word-level tokenizer trained on the IOI vocabulary, in memory (offline, with the
    ``tokenizers`` library): ``data.tokenizer: mi_spec.zoo.ioi:tokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def train_tokenizer(out_dir: str | Path) -> Path:
    """Save ``tokenizer()`` as a Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained``
    loads it offline; ``data.tokenizer: <folder>``). Returns the folder."""
    out = Path(out_dir)
    tokenizer().save_pretrained(str(out))
    return out
