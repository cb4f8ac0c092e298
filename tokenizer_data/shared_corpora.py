"""Mixtures over the development corpora in ../shared/corpora (benchmarks only, not for tests).

  python -m lmtiny.tokenizer.train --mixture tokenizer_data/shared_corpora.py --out tok/seed32k
  python -m lmtiny.tokenizer.train --mixture tokenizer_data/shared_corpora.py:BROAD --out tok/b32k

RECIPE keeps the seed's proportions, 45% encyclopedic / 40% books / 15% conversation. The corpora
hold little encyclopedic and chat text (3.0 M characters of Wikipedia, 3.7 M of chats), so the
encyclopedic share is Wikipedia plus the Python documentation (reference prose in
reStructuredText) and the chats bound the whole mixture to ~23 M characters.
BROAD spends ~100 M characters: the same sources plus Korean reviews and standard-library code
(the embedded corpus's code part), the text types the seed's tokenizer lost on.

Every source holds out documents for evaluation (benchmarks/tokenizer_compare.py reads them
with `held_out_documents`): every N-th document, and by title the Wikipedia articles and Python
module docs used as the math and science evaluation texts.
"""
import os

CORPORA = os.environ.get("LMTINY_CORPORA", "../shared/corpora/train")
MATH_ARTICLES = ("Arithmetic mean", "Analysis of variance", "Algorithm", "Abacus")
SCIENCE_ARTICLES = ("Albedo", "Alkane", "Atomic number", "Alkali metal", "Acid", "Ampere",
                    "Astronomer", "Amphibian", "Algae", "Anatomy", "Actinopterygii",
                    "International Atomic Time")
MATH_MODULE_DOCS = ("math", "cmath", "statistics", "fractions", "decimal", "numbers")

WIKI = dict(spec=f"txt:{CORPORA}/wikipedia_enwiki2016_plain.txt.gz?doc_start=^= .+ =$",
            hold_out_every=10,
            hold_out_pattern="= (%s) =\n" % "|".join(MATH_ARTICLES + SCIENCE_ARTICLES))
PYDOCS = dict(spec=f"txt:{CORPORA}/python311_docs_rst.txt.gz?delimiter=record",
              hold_out_every=20,
              hold_out_pattern=r":mod:`!?(%s)` ---" % "|".join(MATH_MODULE_DOCS))
BOOKS = dict(spec=f"txt:{CORPORA}/gutenberg_en_200MB.txt.gz?delimiter=record",
             hold_out_every=25)
CHAT = dict(spec=f"jsonl:{CORPORA}/topicalchat_conversations.jsonl.gz?field=messages",
            hold_out_every=20)
KOREAN = dict(spec=f"txt:{CORPORA}/korean_nsmc_reviews.txt.gz?delimiter=line",
              hold_out_every=50)
CODE = dict(spec="embedded?parts=code", hold_out_every=10)

RECIPE = dict(
    sources=[dict(WIKI, weight=9.5), dict(PYDOCS, weight=35.5),
             dict(BOOKS, weight=40, sample=0.06), dict(CHAT, weight=15)],
    total_chars=23_000_000,
    seed=0,
)

BROAD = dict(
    sources=[dict(WIKI, weight=2.2), dict(PYDOCS, weight=10.3), dict(BOOKS, weight=55.7, sample=0.32),
             dict(CHAT, weight=3.3), dict(KOREAN, weight=20), dict(CODE, weight=8.5)],
    total_chars=100_000_000,
    seed=0,
)
