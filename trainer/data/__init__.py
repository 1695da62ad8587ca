"""Data for Strata: built-in corpora, readers for users' files, the vocabulary, splits and encoding.

Nothing here imports TensorFlow at import time; only `tf_encoder` / `tf_decoder` do, when called.
"""
from trainer.data.corpora import (
    CANONICAL_VERB,
    COUNT_WORDS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    VERB_SYNONYMS,
    make_classification_corpus,
    make_summarization_corpus,
)
from trainer.data.readers import read_examples, read_tfds
from trainer.data.splits import (
    Splits,
    carve,
    derive_seed,
    encode_examples,
    encode_splits,
    load_splits,
    training_texts,
)
from trainer.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    Vocabulary,
    standardize,
    tf_decoder,
    tf_encoder,
)

__all__ = [
    "BOS", "CANONICAL_VERB", "COUNT_WORDS", "EOS", "NEGATIVE_WORDS", "PAD", "POSITIVE_WORDS",
    "SPECIAL_TOKENS", "Splits", "UNK", "VERB_SYNONYMS", "Vocabulary", "carve",
    "derive_seed", "encode_examples", "encode_splits", "load_splits", "make_classification_corpus",
    "make_summarization_corpus", "read_examples", "read_tfds", "standardize", "tf_decoder",
    "tf_encoder", "training_texts",
]
