"""BLEU and CIDEr-D of captions: parity with pycocoevalcap on fixed strings, the papers' formulas on
hand-worked examples, and the tokenizer against the Java PTBTokenizer's output.

pycocoevalcap is not a test dependency (its wheel is 104 MB, nearly all Java jars for METEOR, SPICE
and the tokenizer), so its numbers are written down here. They were produced once with
pycocoevalcap 1.2 from PyPI (Python 3.11, NumPy 2.4.6, OpenJDK 17), for FIXTURE = PRETOKENISED and RAW:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gts = {k: refs for k, (_, refs) in FIXTURE.items()}
    res = {k: [caption] for k, (caption, _) in FIXTURE.items()}
    # RAW only: both through COCO's Java tokenizer first, as pycocoevalcap's eval.py does
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})  # and res
    Bleu(4).compute_score(gts, res)[0]; Cider().compute_score(gts, res)[0]; Cider(sigma=3.0)...
and printed with repr. The Java tokens in TOKENS came from stanford-corenlp-3.4.1.jar as pycocoevalcap
1.2 ships and runs it (`java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer
-preserveLines -lowerCase`), with its PUNCTUATIONS tokens dropped.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimodal.errors import UserError
from multimodal.eval.captioning import bleu, caption_metrics, cider, tokenize

# Lowercase words without punctuation: the form pycocoevalcap's scorers take, and which `tokenize`
# leaves as it is. Clipping (3), a candidate shorter than 3-grams (4), an exact match (5), nothing but
# "a" shared (6), a closest-length tie (8: 4 words against 3 and 5; the shorter wins).
PRETOKENISED = {
    1: ("a man riding a horse on a beach",
        ["a man rides a horse along the beach", "a person on a horse at the shore",
         "a man on a brown horse near the ocean", "someone riding a horse by the sea",
         "a horseback rider on a sandy beach"]),
    2: ("a plate of food", ["a plate of food with broccoli and rice", "a white plate topped with rice and broccoli",
                            "food on a plate"]),
    3: ("the the the the the the the", ["the cat is on the mat", "there is a cat on the mat"]),
    4: ("a dog", ["a dog catching a frisbee in a park", "a brown dog jumps for a frisbee"]),
    5: ("two giraffes standing in a grassy field", ["two giraffes standing in a grassy field"]),
    6: ("a red bus parked on a city street", ["a kitchen with a stove and a sink", "an empty kitchen"]),
    7: ("a cat sitting on a laptop keyboard", ["a cat laying on a laptop", "a cat sits on the keyboard of a laptop",
                                               "a kitten sitting on a keyboard", "a cat on top of a laptop keyboard"]),
    8: ("a man eating pizza", ["a man eats", "a man eating a pizza"]),
}
PRETOKENISED_BLEU = [0.6986332675038366, 0.594075322803495, 0.5041896014050546, 0.3978367265782525]
PRETOKENISED_CIDER = 2.6716535419521907
PRETOKENISED_CIDER_SIGMA3 = 2.425285656862299

# Captions as people write them: through COCO's Java tokenizer, then the scorers.
RAW = {
    "beach": ("A man riding a horse on the beach.",
              ["A man rides a horse along the beach.", "A person, on a horse, at the shore!",
               "Man on a brown horse near the ocean", "Someone's riding a horse by the sea.",
               "A horseback rider on a sandy beach."]),
    "plate": ("A plate of food (rice and broccoli).",
              ["A plate of food with broccoli and rice.", "A white plate topped with rice & broccoli.",
               "Food on a plate; it's dinner time."]),
    "dogs": ("Two dogs playing with a frisbee in the park",
             ["Two dogs play with a Frisbee in a park.", "The dogs aren't fighting over the frisbee.",
              "Two brown dogs chasing a frisbee on the grass", "A couple of dogs -- one with a frisbee -- in a park"]),
    "sign": ('A "stop" sign on a street corner.',
             ["A red stop sign at the corner of the street.", "A sign that says 'STOP' on a pole.",
              "Stop sign at an intersection in the U.S."]),
    "kitchen": ("a kitchen with a stove",
                ["The kitchen has a stove, a sink, and a fridge.", "An empty kitchen...",
                 "A kitchen with white cabinets and a gas stove."]),
}
RAW_BLEU = [0.9210526315547092, 0.6682596597591972, 0.45739832495505334, 0.3020274857054415]
RAW_CIDER = 1.9233611293054342


def split(fixture):
    return {k: c for k, (c, _) in fixture.items()}, {k: refs for k, (_, refs) in fixture.items()}


def test_parity_with_pycocoevalcap_on_pretokenised_captions():
    candidates, references = split(PRETOKENISED)
    assert bleu(candidates, references) == pytest.approx(PRETOKENISED_BLEU, abs=1e-9)
    assert cider(candidates, references) == pytest.approx(PRETOKENISED_CIDER, abs=1e-9)
    assert cider(candidates, references, sigma=3.0) == pytest.approx(PRETOKENISED_CIDER_SIGMA3, abs=1e-9)


def test_parity_with_the_coco_evaluation_on_raw_captions():
    """Our tokenizer in place of the Java one: the same tokens on these, so the same scores."""
    scores = caption_metrics(*split(RAW))
    assert [scores[f"bleu{k}"] for k in (1, 2, 3, 4)] == pytest.approx(RAW_BLEU, abs=1e-9)
    assert scores["cider"] == pytest.approx(RAW_CIDER, abs=1e-9)
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}


# --- BLEU by hand (Papineni et al. 2002): BLEU-N = BP * (p_1 ... p_N)^(1/N), BP = exp(1 - r/c) if c < r.

def test_bleu_of_a_candidate_equal_to_its_only_reference_is_one():
    assert bleu({0: "a man riding a horse"}, {0: ["a man riding a horse"]}) == pytest.approx([1.0] * 4, abs=1e-9)


def test_bleu_of_a_candidate_sharing_no_ngram_is_zero():
    assert bleu({0: "two red buses"}, {0: ["a cat sleeping", "the dog"]}) == pytest.approx([0.0] * 4, abs=1e-12)


def test_bleu_brevity_penalty_and_the_eps_for_missing_ngrams():
    # c = 2, r = 5: BP = exp(1 - 5/2). p_1 = p_2 = 1; no 3- or 4-grams, so p_3 = p_4 = 1e-15 / 1e-9 = 1e-6
    # (pycocoevalcap's eps), hence BLEU-3 = (1e-6)^(1/3) BP and BLEU-4 = (1e-6 * 1e-6)^(1/4) BP.
    bp = math.exp(-1.5)
    expected = [bp, bp, 1e-2 * bp, 1e-3 * bp]
    assert bleu({0: "a man"}, {0: ["a man riding a horse"]}) == pytest.approx(expected, rel=1e-8)


def test_bleu_clips_counts_by_the_most_in_one_reference():
    # The paper's example: 7 "the", at most 2 in one reference, so p_1 = 2/7; r = 7 (closest), BP = 1.
    scores = bleu({0: "the the the the the the the"}, {0: ["the cat is on the mat", "there is a cat on the mat"]})
    assert scores[0] == pytest.approx(2 / 7, rel=1e-8)


def test_bleu_sums_counts_over_the_corpus_before_dividing():
    # Matches (2 + 1) / candidate unigrams (2 + 4) = 1/2, not the mean of 2/2 and 1/4; c = r = 6.
    scores = bleu({"a": "a cat", "b": "a dog runs fast"}, {"a": ["a cat"], "b": ["a cat sleeps now"]})
    assert scores[0] == pytest.approx(0.5, rel=1e-8)


def test_bleu_closest_reference_length_tie_goes_to_the_shorter():
    # 4 words between references of 3 and 5: r = 3, so no brevity penalty (r = 5 would give exp(-1/4)).
    scores = bleu({0: "a man eating pizza"}, {0: ["a man eats", "a man eating a pizza"]})
    assert scores[0] == pytest.approx(1.0, abs=1e-9)


# --- CIDEr-D by hand (Vedantam et al. 2015, section 4), with L = log(2): two images, so an n-gram in the
# references of one weighs tf * (log 2 - log 1) = tf * L, one in both (here "a") weighs 0, and one in none
# weighs tf * L too (df is floored at 1). The captions of each pair have equal lengths in the first
# example, where the paper's tf normalisation cancels; the second follows pycocoevalcap's raw counts.

def test_cider_identical_short_caption_and_zero_for_no_overlap():
    # "dog": unigram sim = (L * L) / (L * L) = 1 ("a" weighs 0), bigram "a dog" likewise 1, no 3- or
    # 4-grams so 0: 10 * (1 + 1 + 0 + 0) / 4 = 5. "bird" shares only "a": 0. CIDEr-D = (5 + 0) / 2.
    candidates = {"dog": "a dog", "bird": "a bird"}
    references = {"dog": ["a dog"], "bird": ["a cat"]}
    assert cider(candidates, references) == pytest.approx(2.5, rel=1e-12)


def test_cider_clips_counts_and_penalises_length():
    # "dog": candidate "a dog dog" against "a dog".
    #   unigrams: candidate {dog: 2L} (norm 2L), reference {dog: L} (norm L): min(2L, L) * L / (2L * L) = 1/2
    #   bigrams: candidate {"a dog": L, "dog dog": L} (norm sqrt(2) L), reference {"a dog": L}: 1/sqrt(2)
    #   trigrams: the reference has none, so 0; 4-grams: none.
    #   length penalty exp(-(3 - 2)^2 / (2 * 6^2)) = exp(-1/72); image score 10 * (1/2 + 1/sqrt(2)) / 4 * it.
    # "cat": identical "a cat", 5 as above.
    dog = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    candidates = {"dog": "a dog dog", "cat": "a cat"}
    references = {"dog": ["a dog"], "cat": ["a cat"]}
    assert cider(candidates, references) == pytest.approx((dog + 5) / 2, rel=1e-12)


def test_cider_of_a_single_image_is_zero():
    # Document frequencies come from the evaluated set: with one image every reference n-gram weighs log(1/1).
    assert cider({0: "a man riding a horse"}, {0: ["a man riding a horse"]}) == 0.0


# --- Tokenisation

TOKENS = [  # (caption, the Java PTBTokenizer's tokens with COCO's punctuation dropped)
    ('A man, riding a horse.',
     'a man riding a horse'),
    ('The dog\'s ball (red) is "big" and [blue] {green}.',
     "the dog 's ball -lrb- red -rrb- is big and -lsb- blue -rsb- -lcb- green -rcb-"),
    ("I can't believe it's not butter!",
     "i ca n't believe it 's not butter"),
    ('Mr. Smith went to Washington D.C. in the U.S.A.',
     'mr. smith went to washington d.c. in the u.s.a.'),
    ('A cat -- sitting on a mat; looking: happy? yes...',
     'a cat sitting on a mat looking happy yes'),
    ('Two people at 3:30 p.m. with $5.00 and 50% off',
     'two people at 3:30 p.m. with $ 5.00 and 50 % off'),
    ("An e-mail from a well-known person's dog.",
     "an e-mail from a well-known person 's dog"),
    ("The children's toys weren't there, they'd gone.",
     "the children 's toys were n't there they 'd gone"),
    ('gonna wanna gotta cannot',
     'gon na wan na got ta can not'),
    ('yes?? no!!! ok?! hm?',
     'yes ?? no !!! ok ?! hm'),
    ("the dogs' bowls",
     'the dogs bowls'),
    ('\u201cCurly\u201d \u2018single\u2019 don\u2019t it\u2019s',
     "curly single do n't it 's"),
    ("1,000 people and 3.5 dogs in the '90s",
     "1,000 people and 3.5 dogs in the '90s"),
    ('a - b and x-ray and word- and -word',
     'a b and x-ray and word and word'),
    ('wait...what hello,world',
     'wait what hello world'),
    ('a man wearing a no. 23 jersey',
     'a man wearing a no. 23 jersey'),
    ('a sign reading no. parking',
     'a sign reading no parking'),
    ('a man w/ a dog on the st.',
     'a man w / a dog on the st.'),
    ('a tennis player hits the ball with his racket.....',
     'a tennis player hits the ball with his racket'),
]


@pytest.mark.parametrize("caption, java", TOKENS)
def test_tokenize_matches_the_java_ptb_tokenizer(caption, java):
    assert tokenize(caption) == java.split()


def test_tokenize_lowercases_and_drops_coco_punctuation():
    assert tokenize("A man, riding a horse.") == ["a", "man", "riding", "a", "horse"]
    assert tokenize("  ") == [] and tokenize("...!") == []


PIECES = st.sampled_from(list("abst n'.-,!?()\"`:;/@#0&%$ 19") + ["can't", "cannot", "'s", "u.s.", "...", "mr.",
                                                                  "no. 5", "-lrb-", "\u2019", "\u2014"])


@given(st.lists(PIECES, max_size=14).map("".join))
@settings(max_examples=300, deadline=None)
def test_tokenize_leaves_its_own_output_as_it_is(caption):
    """So already-tokenised captions (what pycocoevalcap's scorers take) pass through unchanged."""
    tokens = tokenize(caption)
    assert tokenize(" ".join(tokens)) == tokens


# --- Input a user can get wrong

@pytest.mark.parametrize("candidates, references, words", [
    ({}, {}, "No captions"),
    ({1: "a dog"}, {2: ["a dog"]}, "same images"),
    ({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, "same images"),
    ({1: "a dog"}, {1: "a dog"}, "non-empty list"),
    ({1: "a dog"}, {1: []}, "non-empty list"),
    ({1: ["a dog"]}, {1: ["a dog"]}, "one caption, a string"),
])
def test_mismatched_or_empty_input_is_one_sentence(candidates, references, words):
    with pytest.raises(UserError, match=words) as info:
        caption_metrics(candidates, references)
    assert "\n" not in str(info.value) and str(info.value).endswith(".")
