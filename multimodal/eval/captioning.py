"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4 and CIDEr-D.

Each image has one generated caption and all its reference captions. Every caption goes through
`tokenize` (our stand-in for COCO's Java PTBTokenizer); the scores then follow pycocoevalcap's
`Bleu(4)` and `Cider()` scorers number for number, their quirks included (each function says which).

References:
- Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation".
- Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation", arXiv:1411.5726
  and its CIDEr-D, the variant (clipping, length penalty) that pycocoevalcap's `Cider` computes.
- Chen et al. 2015, "Microsoft COCO Captions: Data Collection and Evaluation Server",
  arXiv:1504.00325; its code is pycocoevalcap (github.com/salaniz/pycocoevalcap, 1.2 on PyPI).
"""

import math
import random
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from multimodal.errors import UserError

# pycocoevalcap/tokenizer/ptbtokenizer.py's PUNCTUATIONS: the tokens dropped after tokenising. Java
# lowercases "-LRB-" to "-lrb-" before this filter, so COCO keeps brackets as "-lrb-" tokens; so do we.
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPELLING = str.maketrans({"\u2019": "'", "\u2018": "`", "\u201c": '"', "\u201d": '"', "\u2026": "...",
                           "\u2013": "--", "\u2014": "--"})
_ASSIMILATION = re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(lem|gim)(me)\b")
_CLITIC = r"n't|'(?:s|d|m|re|ve|ll)"
_LETTER, _ALNUM = r"[^\W\d_]", r"[^\W_]"
_SPLIT_CLITIC = re.compile(rf"(?<={_ALNUM})({_CLITIC})(?!{_LETTER})")
_TOKEN = re.compile(rf"""
    (?P<word>{_ALNUM}+(?:(?:[-./@]|(?<={_LETTER})'(?={_LETTER})|(?<=\d)[,:](?=\d)){_ALNUM}+)*)(?P<dot>\.(?!\.\.))?
  | -(?:lrb|rrb|lsb|rsb|lcb|rcb)-          # already-tokenised brackets stay as they are
  | (?:{_CLITIC})(?!{_LETTER}) | '\d\d s?(?=\s|$)   # "'s", "n't", "'90s"
  | [\#@]{_LETTER}\w*                       # hashtags and handles are single tokens
  | \.{{3,}} | -{{2,}} | [!?]+ | `+ | '+ | \S
""", re.VERBOSE)
_ACRONYM = re.compile(rf"{_LETTER}(?:\.{_LETTER})*")  # "a", "u.s": the period stays theirs
_ABBREVIATIONS = frozenset(["mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "inc", "co", "ltd", "ave", "vs", "etc",
                            "ph.d"])
_BEFORE_NUMBER = re.compile(r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.[ \t]?\d")  # "no. 5" keeps its period


def _spelled(token: str) -> str:
    """The form Java writes a token in: brackets by name, '"' as a quote pair, dash and dot runs cut."""
    if token in _BRACKETS:
        return _BRACKETS[token]
    if token == '"':
        return "''"
    if len(token) > 1 and set(token) == {"-"}:
        return "--"
    if len(token) > 2 and set(token) == {"."}:
        return "..."
    return token


def tokenize(caption: str) -> list[str]:
    """A caption's tokens, as pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1's PTBTokenizer
    with -preserveLines -lowerCase, then COCO_PUNCTUATION dropped) gives them on ordinary captions.

    The rules, in order:
    1. Curly quotes become straight ones, "\u2026" becomes "...", en and em dashes become "--"; all
       is lowercased.
    2. "cannot", "gonna", "wanna", "gotta", "lemme", "gimme" split in two ("can not", "gon na").
    3. The clitics n't 's 'd 'm 're 've 'll split off a word when no letter follows: "can't" ->
       "ca n't", "dog's" -> "dog 's".
    4. A word is a run of letters and digits, joined inside by - . / @ (so "e-mail", "3.5",
       "stop/go", "x@y.com" stay whole), by ' between letters ("o'clock") or by , : between
       digits ("1,000", "3:30"). A period right after a word stays with it only for an acronym or
       initial ("u.s.", "a."), one of the abbreviations mr mrs ms dr st mt jr sr inc co ltd ave
       vs etc ph.d, or no nos ca fig figs art bldg pp op prop before a number ("no. 5").
    5. Brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- and are kept (see COCO_PUNCTUATION).
       Runs of 3+ periods, of 2+ hyphens, of ! and ?, of backquotes and of apostrophes are one
       token each; "#tag" and "@name" are one token; any other character is a token of its own.
    6. The tokens in COCO_PUNCTUATION (".", ",", "?", "!", quotes, "-", "--", "...", ...) are
       dropped; others ("!!", "?!", "$", "%", "&", "/") are kept, as COCO keeps them.

    Where this differs from the Java tokenizer (checked against stanford-corenlp-3.4.1.jar): its
    full abbreviation list and sentence-final acronym rules; emoticons (":)" is ":-rrb-" there,
    "-rrb-" here); "'n'", "'tis", "y'all" and "no.5" split there; "#1" is "# 1" there; URLs,
    fractions ("8 1/2"), SGML and other text that is not ordinary English prose.
    """
    text = _ASSIMILATION.sub(lambda m: " ".join(g for g in m.groups() if g), caption.translate(_SPELLING).lower())
    text = _SPLIT_CLITIC.sub(r" \1", text)
    tokens = []
    for match in _TOKEN.finditer(text):
        word, dot = match.group("word", "dot")
        if word and dot and not (_ACRONYM.fullmatch(word) or word in _ABBREVIATIONS
                                 or _BEFORE_NUMBER.match(text, match.start("word"))):
            tokens += [word, dot]
        else:
            tokens.append(_spelled(match.group(0)))
    return [t for t in tokens if t not in COCO_PUNCTUATION]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the 1- to n-grams of `tokens`, each a tuple."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tokenized(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
               ) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Each image's tokenised caption and references, in the order of `candidates`; a UserError when
    the two do not cover the same images or an image lacks a caption or references."""
    if not candidates:
        raise UserError("No captions to evaluate: give at least one image a generated caption and its references.")
    unmatched = [f"{len(keys)} image(s) {lack} (such as {next(iter(keys))!r})"
                 for keys, lack in ((set(candidates) - set(references), "have a caption but no references"),
                                    (set(references) - set(candidates), "have references but no caption")) if keys]
    if unmatched:
        raise UserError(f"Generated captions and references must be for the same images: {' and '.join(unmatched)}.")
    for key, caption in candidates.items():
        if not isinstance(caption, str):
            raise UserError(f"The generated caption of image {key!r} is a {type(caption).__name__}: give each "
                            "image one caption, a string.")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"The references of image {key!r} are not a non-empty list of strings: give each image a "
                            "list of its reference captions.")
    return ([tokenize(candidates[k]) for k in candidates],
            [[tokenize(r) for r in references[k]] for k in candidates])


def bleu(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], n: int = 4
         ) -> list[float]:
    """Corpus BLEU-1..n of one caption an image against all its references, as pycocoevalcap's `Bleu(n)`.

    BLEU-N = BP * (p_1 * ... * p_N) ** (1/N), with p_k = (sum over images of the candidate's k-gram
    counts, each clipped to its largest count in one reference of that image) / (sum of the
    candidate's k-gram counts), and the brevity penalty BP = exp(1 - r / c) when c < r, else 1:
    c is the total candidate length, r the total of each image's reference length closest to its
    candidate's (a tie goes to the shorter). Counts are summed over the corpus before dividing,
    as in Papineni et al. 2002, so this is not the mean of per-image BLEU.

    pycocoevalcap's eps: p_k = (matches + 1e-15) / (total + 1e-9) and the length ratio is
    (c + 1e-15) / (r + 1e-9), so a corpus with no k-grams has p_k = 1e-6, not 0 or 1. Its scorer
    always counts up to 4-grams, so it fails for n > 4; here any n works.
    """
    tiny, small = 1e-15, 1e-9
    correct, total = [0] * n, [0] * n
    candidate_length = reference_length = 0
    for candidate, refs in zip(*_tokenized(candidates, references)):
        most = Counter()
        for ref in refs:
            most |= _ngrams(ref, n)  # elementwise max: the clip of each n-gram
        for gram, count in _ngrams(candidate, n).items():
            correct[len(gram) - 1] += min(count, most[gram])
        for k in range(n):
            total[k] += max(0, len(candidate) - k)
        candidate_length += len(candidate)
        reference_length += min((abs(len(ref) - len(candidate)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (total[k] + small)
        scores.append(product ** (1 / (k + 1)))
    ratio = (candidate_length + tiny) / (reference_length + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [score * penalty for score in scores]


def cider(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], n: int = 4,
          sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) of one caption an image, as pycocoevalcap's `Cider()`.

    Each caption s becomes, for each order k, a vector g_k(s) over k-grams w:
        g_k(s)[w] = count of w in s * log(I / max(1, df(w))),
    with I the number of images evaluated and df(w) the number of them with w in some reference
    (so a k-gram in every image's references weighs 0). Against each reference s_j of an image:
        sim_k(c, s_j) = sum_w min(g_k(c)[w], g_k(s_j)[w]) * g_k(s_j)[w] / (|g_k(c)| |g_k(s_j)|)
                        * exp(-(len(c) - len(s_j))**2 / (2 sigma**2)),
    (the quotient only where both norms are non-zero; 0 otherwise), and the image scores
    10 * mean over k = 1..n of mean over j of sim_k. CIDEr-D is the mean over images.
    As in pycocoevalcap, the term frequency is the raw count; the paper divides it by the
    caption's n-gram total, which changes the clipped numerator when lengths differ. Its scorer
    always counts up to 4-grams (n < 4 fails there, n > 4 adds zeros); here n is the highest order.
    """
    candidate_tokens, reference_tokens = _tokenized(candidates, references)
    candidate_grams = [_ngrams(c, n) for c in candidate_tokens]
    reference_grams = [[_ngrams(r, n) for r in refs] for refs in reference_tokens]
    document_frequency = Counter(gram for refs in reference_grams for gram in set().union(*refs))
    log_images = math.log(len(candidate_grams))

    def vectors(counts: Counter) -> tuple[list[dict], list[float]]:
        vec = [{} for _ in range(n)]
        for gram, count in counts.items():
            vec[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, document_frequency[gram])))
        return vec, [math.sqrt(sum(v * v for v in order.values())) for order in vec]

    scores = []
    for tokens, counts, refs, ref_grams in zip(candidate_tokens, candidate_grams, reference_tokens, reference_grams):
        vec, norm = vectors(counts)
        total = 0.0
        for ref, grams in zip(refs, ref_grams):
            # pycocoevalcap measures lengths in bigrams (its `n == 1`); that differs from words only for an
            # empty caption, whose vector is zero, so the score is the same.
            penalty = math.exp(-((len(tokens) - len(ref)) ** 2) / (2 * sigma**2))
            ref_vec, ref_norm = vectors(grams)
            for k in range(n):
                dot = sum(min(v, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] and ref_norm[k]:
                    dot /= norm[k] * ref_norm[k]
                total += dot * penalty
        scores.append(10.0 * total / n / len(refs))
    return sum(scores) / len(scores)


def caption_metrics(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
                    ) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of generated captions, by image, against all references of each image:
    {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}, on a 0-1 scale for BLEU and 0-10 for CIDEr-D."""
    scores = {f"bleu{k}": value for k, value in enumerate(bleu(candidates, references), start=1)}
    return scores | {"cider": cider(candidates, references)}


def chance_captions(references: Mapping[Hashable, Sequence[str]], seed: int = 0) -> dict[Hashable, str]:
    """The chance baseline: each image given the first reference caption of another image (a random
    cyclic shift of a random order: never its own), scored like a model's captions."""
    keys = random.Random(seed).sample(sorted(references, key=str), len(references))
    return {key: references[other][0] for key, other in zip(keys, keys[1:] + keys[:1])}
