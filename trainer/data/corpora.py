"""Built-in corpora: generated deterministically from a seed, never downloaded.

They exist so every feature of the framework (distribution, checkpoints, serving) can be exercised and
tested offline, with tasks that are small but *genuinely learnable*:

* classification: short reviews whose clean label is the majority sentiment of their sentiment words
  (both classes use the same positive and negative words, the minority ones included), among neutral
  filler; then a known fraction `label_noise` of the labels is flipped. The clean label is a function of
  the text (`majority_sentiment`), and which labels are flipped does not depend on the text, so the best
  accuracy any model can reach is exactly `best_accuracy(n, label_noise)` (1 - label_noise): a quality
  test has a bound to measure against, and a model at 1.0 would mean a leak.
* summarization: 3-5 sentences in random order, exactly one of which is a "fact"
  (`<entity> <verb> <count> <object> in <place>` in several surface forms); the summary is a normalized
  rewrite of that fact (canonical verb, digits), e.g. "acme buys 3 farms in oslo". Because the fact
  sentence is anywhere, a "first N words" baseline scores poorly; a model must find and rewrite it.

Only Python's `random.Random` with integer seeds is used, so outputs are identical across platforms.
This module must not import TensorFlow.
"""
from __future__ import annotations

import random
import re

from trainer.data.tokenizer import standardize

# ------------------------------------------------------------------------------ classification
POSITIVE_WORDS: tuple[str, ...] = (
    "good", "great", "excellent", "wonderful", "delightful", "superb", "pleasant", "friendly",
    "lovely", "fantastic", "brilliant", "amazing", "charming", "helpful", "comfortable", "perfect",
    "enjoyable", "impressive", "tasty", "spotless", "relaxing", "generous", "cheerful", "stunning",
)
NEGATIVE_WORDS: tuple[str, ...] = (
    "bad", "terrible", "awful", "horrible", "dreadful", "rude", "dirty", "boring", "poor",
    "disappointing", "unpleasant", "noisy", "broken", "stale", "bland", "mediocre", "overpriced",
    "annoying", "cramped", "greasy", "smelly", "shabby", "careless", "gloomy",
)
_NOUNS = (
    "room", "staff", "food", "service", "view", "breakfast", "bed", "lobby", "pool", "menu",
    "waiter", "coffee", "bathroom", "location", "price", "music", "garden", "kitchen", "desk",
    "parking", "dessert", "soup", "terrace", "wifi", "shower", "bar", "manager", "pizza",
)
_PLACES = ("station", "beach", "museum", "airport", "market", "harbour", "old town", "park")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_PEOPLE = ("my sister", "my husband", "my wife", "our son", "a friend", "my mother", "we", "i")
# One sentiment slot {s}; the rest neutral. Short (<= 7 tokens) so 9 of them fit in 64 tokens.
_SENTIMENT_TEMPLATES = (
    "the {n} was {s}",
    "we found the {n} {s}",
    "honestly the {n} seemed {s}",
    "it was a {s} {n}",
    "the {n} felt {s} to us",
    "what a {s} {n}",
    "{p} thought the {n} was {s}",
    "overall {s} {n} !",
)
# Two slots of the SAME polarity: denser sentiment per token, so mean-pooled features carry more signal.
_DOUBLE_SENTIMENT_TEMPLATES = (
    "the {n} was {s} and {s2}",
    "a {s} {n} and a {s2} {n2}",
    "{s} {n} , {s2} {n2}",
    "the {n} felt {s} but also {s2}",
)
_NEUTRAL_TEMPLATES = (
    "we arrived on {d}",
    "the hotel is near the {pl}",
    "{p} ordered the {n}",
    "we stayed for {k} nights",
    "the {n} opens at {k}",
    "{p} went to the {pl} on {d}",
    "we booked the {n} in advance",
    "there is a {n} next to the {pl}",
)
_AN_RE = re.compile(r"(^|\s)a ([aeiou])")
_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_CLS_MAX_TOKENS = 64


def _fill(template: str, rng: random.Random, sentiment: str = "", sentiment2: str = "") -> str:
    text = template.format(
        n=rng.choice(_NOUNS), n2=rng.choice(_NOUNS), s=sentiment, s2=sentiment2, pl=rng.choice(_PLACES),
        d=rng.choice(_DAYS), p=rng.choice(_PEOPLE), k=rng.choice(_NUMBER_WORDS),
    )
    return _AN_RE.sub(r"\1an \2", text)  # "a impressive food" -> "an impressive food"


def _sentiment_sentences(count: int, words: tuple[str, ...], rng: random.Random) -> list[str]:
    """Sentences holding exactly `count` words drawn from `words`, one or two per sentence."""
    out = []
    while count:
        if count >= 2 and rng.random() < 0.5:
            out.append(_fill(rng.choice(_DOUBLE_SENTIMENT_TEMPLATES), rng, rng.choice(words), rng.choice(words)))
            count -= 2
        else:
            out.append(_fill(rng.choice(_SENTIMENT_TEMPLATES), rng, rng.choice(words)))
            count -= 1
    return out


def _token_count(text: str) -> int:
    # Same split the tokenizer uses, close enough for length budgeting ("!" and "," are dropped).
    return sum(1 for w in text.split() if any(c.isalnum() for c in w))


LABEL_NOISE = 0.1  # default fraction of built-in classification labels flipped (data.builtin.label_noise)


def majority_sentiment(text: str) -> int:
    """The clean label of a built-in review: 1 iff it has more POSITIVE_WORDS than NEGATIVE_WORDS."""
    words = standardize(text)
    positive, negative = set(POSITIVE_WORDS), set(NEGATIVE_WORDS)
    return int(sum(w in positive for w in words) > sum(w in negative for w in words))


def flipped_count(n: int, label_noise: float) -> int:
    """How many of `n` built-in labels are flipped: round(label_noise * n), exactly."""
    return round(label_noise * n)


def best_accuracy(n: int, label_noise: float = LABEL_NOISE) -> float:
    """The best accuracy any classifier can reach on `n` built-in examples (the Bayes-optimal one's).

    The clean label is a function of the text and the flipped examples are chosen independently of the
    text (uniformly within each clean class, label_noise < 0.5), so for every text the clean label is the
    most likely observed one: predicting it is optimal and is wrong on exactly the flipped examples.
    """
    return 1.0 - flipped_count(n, label_noise) / n if n else 0.0


def make_classification_corpus(n: int, seed: int, label_noise: float = LABEL_NOISE) -> list[dict]:
    """`n` reviews `{"text": str, "label": 0|1}`, classes balanced (differ by at most one).

    Clean label = 1 iff the text has more POSITIVE_WORDS than NEGATIVE_WORDS (never a tie): 2-5 majority
    sentiment words, fewer minority ones (one or two per sentence), plus 1-3 neutral sentences,
    shuffled; at most 64 tokens. Then exactly `flipped_count(n, label_noise)` labels are flipped, half
    from each clean class (so the classes stay balanced), chosen at random whatever the text says.
    """
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise {label_noise} must be in [0, 0.5): at 0.5 the labels carry no signal")
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)  # balanced, in random order
    out: list[dict] = []
    for label in labels:
        n_major = rng.choice((2, 3, 3, 4, 4, 5))
        n_minor = rng.randint(0, n_major - 1)  # strict majority: the rule is never ambiguous
        major, minor = (POSITIVE_WORDS, NEGATIVE_WORDS) if label else (NEGATIVE_WORDS, POSITIVE_WORDS)
        sentences = _sentiment_sentences(n_major, major, rng) + _sentiment_sentences(n_minor, minor, rng)
        neutral = [_fill(rng.choice(_NEUTRAL_TEMPLATES), rng) for _ in range(rng.randint(1, 3))]
        # Drop neutral sentences (never sentiment ones: they carry the label) to respect the length cap.
        while neutral and sum(map(_token_count, sentences + neutral)) > _CLS_MAX_TOKENS:
            neutral.pop()
        sentences += neutral
        rng.shuffle(sentences)
        text = " . ".join(sentences) + rng.choice((" .", " .", " !", ""))
        # "overall good room !" already ends its sentence: don't follow it with another mark.
        text = text.replace(" ! .", " !").replace(" ! !", " !")
        out.append({"text": text, "label": label})
    _flip_labels(out, flipped_count(n, label_noise), rng)
    return out


def _flip_labels(examples: list[dict], count: int, rng: random.Random) -> None:
    """Flip `count` labels in place, as evenly as possible from each class, uniformly within a class."""
    by_class = [[i for i, e in enumerate(examples) if e["label"] == c] for c in (0, 1)]
    first = rng.randrange(2)  # which class gives the odd one out
    for c in (first, 1 - first):
        share = count // 2 + (count % 2 if c == first else 0)
        for i in rng.sample(by_class[c], min(share, len(by_class[c]))):
            examples[i]["label"] = 1 - c


# ------------------------------------------------------------------------------- summarization
# Past-tense surface forms in documents -> the canonical present-tense verb used in summaries.
# None of the canonical forms occurs in documents, so the summary is a rewrite, not a copy.
VERB_SYNONYMS: dict[str, tuple[str, ...]] = {
    "buys": ("acquired", "bought", "purchased"),
    "sells": ("sold", "divested", "offloaded"),
    "builds": ("built", "constructed", "erected"),
    "closes": ("closed", "shuttered", "shut"),
    "opens": ("opened", "launched", "unveiled"),
    "leases": ("leased", "rented", "chartered"),
}
CANONICAL_VERB: dict[str, str] = {syn: canon for canon, syns in VERB_SYNONYMS.items() for syn in syns}
# Counts appear in documents as digits or words; summaries always use digits.
COUNT_WORDS: dict[str, str] = {
    "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}
_ENTITIES = (
    "acme", "globex", "initech", "umbrella", "hooli", "vandelay", "stark", "wayne", "tyrell",
    "cyberdyne", "soylent", "wonka", "oscorp", "nakatomi", "massive", "aperture", "virtucon",
    "gringotts", "monarch", "dunder", "pied", "sterling", "krusty", "zorg", "omni", "rekall",
    "veridian", "lacuna", "gekko", "bluth",
)
_OBJECTS = (
    "farms", "hotels", "mines", "factories", "stores", "ships", "warehouses", "offices", "bakeries",
    "clinics", "studios", "vineyards", "bridges", "towers", "schools", "restaurants", "garages",
    "ferries", "depots", "theatres",
)
_CITIES = (
    "oslo", "lima", "cairo", "dublin", "lagos", "quito", "perth", "hanoi", "riga", "porto",
    "nairobi", "denver", "kyoto", "munich", "austin", "lisbon", "seoul", "tunis", "malmo", "bergen",
    "leeds", "kiev", "dakar", "boston", "madrid", "vienna", "zurich", "delhi", "osaka", "sofia",
)
_FACT_TEMPLATES = (
    "{e} {v} {c} {o} in {p}",
    "last week {e} {v} {c} {o} in {p}",
    "in {p} , {e} {v} {c} {o}",
    "{e} has {v} {c} {o} in {p} , officials said",
    "according to reports , {e} {v} {c} {o} in {p}",
    "on {d} {e} quietly {v} {c} {o} in {p}",
)
# Filler never uses a verb synonym, an entity, an object or a small count, so the fact is unique;
# some filler names a city as a distractor, so "the place" must be read from the fact sentence.
_FILLER_TEMPLATES = (
    "the weather in {p} was {w} on {d}",
    "analysts said the market remained {m}",
    "shares ended slightly {u} on {d}",
    "a spokesperson declined to comment further",
    "the company employs about {h} people",
    "investors reacted calmly to the news",
    "more details are expected later this {t}",
    "local officials in {p} welcomed the plan",
    "critics raised concerns about the cost",
    "the announcement came on {d}",
    "the board met twice this {t}",
    "traffic in {p} was heavy on {d}",
)
_WEATHER = ("mild", "cold", "rainy", "sunny", "windy", "warm")
_MARKET = ("stable", "cautious", "volatile", "quiet", "strong", "weak")
_UPDOWN = ("higher", "lower")
_PERIODS = ("month", "week", "year", "quarter")
_HEADCOUNTS = ("100", "200", "300", "400", "500", "600", "700", "800", "900")


def make_summarization_corpus(n: int, seed: int) -> list[dict]:
    """`n` examples `{"document": str, "summary": str}`; documents <= 60 tokens, summaries 6 words.

    The summary is "<entity> <canonical verb> <count digits> <object> in <place>", read from the one
    fact sentence, which sits at a random position among 2-4 filler sentences.
    """
    rng = random.Random(seed)
    out: list[dict] = []
    for _ in range(n):
        canon = rng.choice(sorted(VERB_SYNONYMS))
        entity, obj, city = rng.choice(_ENTITIES), rng.choice(_OBJECTS), rng.choice(_CITIES)
        count_word = rng.choice(sorted(COUNT_WORDS))
        count_digits = COUNT_WORDS[count_word]
        fact = rng.choice(_FACT_TEMPLATES).format(
            e=entity, v=rng.choice(VERB_SYNONYMS[canon]), o=obj, p=city, d=rng.choice(_DAYS),
            c=count_word if rng.random() < 0.5 else count_digits,
        )
        fillers = rng.sample(_FILLER_TEMPLATES, rng.randint(2, 4))  # distinct: no repeated sentences
        sentences = [fact] + [
            f.format(p=rng.choice(_CITIES), w=rng.choice(_WEATHER), d=rng.choice(_DAYS),
                     m=rng.choice(_MARKET), u=rng.choice(_UPDOWN), t=rng.choice(_PERIODS),
                     h=rng.choice(_HEADCOUNTS))
            for f in fillers
        ]
        rng.shuffle(sentences)
        out.append({
            "document": " . ".join(sentences) + " .",
            "summary": f"{entity} {canon} {count_digits} {obj} in {city}",
        })
    return out
