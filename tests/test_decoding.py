"""Decoding against its definitions: the filters' kept sets (property-based), greedy against a row-by-row
argmax, temperature 0 against greedy, beam search against exhaustive search and against a plain
one-item-at-a-time beam search that never stops early (plus scripted cases where stopping too early
would show), one beam against greedy, seeds, padding and max_length, sampling frequencies against the
filtered distribution, and the one-sentence errors."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from multimodal.decoding import Decoding, generate, sample_next, top_k_filter, top_p_filter
from multimodal.errors import UserError

END, PAD = 1, 99  # PAD outside the vocabulary, so padding shows
SAMPLING = ("greedy", "top_k", "top_p")
PROPERTIES = settings(max_examples=150, deadline=None, database=None)


def toy_model(V: int, B: int, seed: int, scale: float = 3.0, end_bias: float = 0.0):
    """next_logits depending on the last token, the whole prefix (its sum) and the batch item."""
    g = torch.Generator().manual_seed(seed)
    table, prefix, bias = (scale * torch.randn(n, V, generator=g, dtype=torch.float64) for n in (V, V, B))
    bias[:, END] += end_bias

    def next_logits(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return table[tokens[:, -1]] + prefix[tokens.sum(1) % V] + bias[rows]

    return next_logits


def prompts(B: int, T0: int = 1) -> torch.Tensor:
    return torch.arange(B * T0).view(B, T0) % 3 + 2  # any tokens but END


@given(st.lists(st.floats(-20, 20), min_size=1, max_size=30), st.floats(0, 1, exclude_min=True))
@example([0.0] * 17, 0.5)  # ties: the lowest ids stay, the argmax among them
@PROPERTIES
def test_top_p_keeps_the_smallest_set_reaching_p(values, p):
    logits = torch.tensor(values, dtype=torch.float64)
    filtered = top_p_filter(logits, p)
    kept = filtered.isfinite()
    probs = logits.softmax(-1)
    assert torch.equal(filtered[kept], logits[kept])
    assert kept[logits.argmax()]
    assert probs[kept].min() >= torch.cat([probs[~kept], probs.new_zeros(1)]).max()  # the most likely ones
    assert probs[kept].sum() >= p - 1e-9  # reaches p ...
    assert probs[kept].sum() - probs[kept].min() < p + 1e-9  # ... and without its least likely token would not


def test_top_p_edges():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    tiny = top_p_filter(logits, 1e-6)
    assert torch.equal(tiny.isfinite(), torch.nn.functional.one_hot(logits.argmax(-1), 50).bool())
    assert torch.equal(top_p_filter(logits, 0.7)[2], top_p_filter(logits[2], 0.7))  # rows independent
    for V, p, kept in [(4, 0.5, 2), (4, 0.51, 3), (17, 0.5, 9)]:  # ties, sums reaching p exactly: the first ids
        assert top_p_filter(torch.zeros(V), p).isfinite().tolist() == [True] * kept + [False] * (V - kept)


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.integers(1, 15))
@PROPERTIES
def test_top_k_keeps_the_k_largest(values, k):  # small integers: many ties
    logits = torch.tensor(values, dtype=torch.float32)
    filtered = top_k_filter(logits, k)
    kept = filtered.isfinite()
    assert int(kept.sum()) == min(k, len(values))
    assert torch.equal(filtered[kept], logits[kept])
    assert logits[kept].min() >= torch.cat([logits[~kept], logits.new_full((1,), -math.inf)]).max()
    if k >= len(values):
        assert torch.equal(filtered, logits)


def test_greedy_is_the_argmax_row_by_row_and_temperature_0_is_greedy():
    B, T0, V, max_length = 5, 2, 7, 12
    for seed in range(4):
        model = toy_model(V, B, seed)
        greedy = generate(model, prompts(B, T0), END, PAD, Decoding(max_length=max_length))
        for b in range(B):  # from the definition, one item at a time
            seq = prompts(B, T0)[b].tolist()
            while len(seq) < T0 + max_length and seq[-1] != END:  # the prompts hold no END
                seq.append(int(model(torch.tensor([seq]), torch.tensor([b])).argmax()))
            assert greedy[b, : len(seq)].tolist() == seq
            assert (greedy[b, len(seq):] == PAD).all()
        for strategy in ("top_k", "top_p"):
            cold = Decoding(strategy, max_length=max_length, temperature=0, top_k=2, top_p=0.5)
            assert torch.equal(generate(model, prompts(B, T0), END, PAD, cold), greedy)


def score(model, prompt: list[int], row: int, generated: list[int], length_penalty: float) -> float:
    logp = 0.0
    for t in range(len(generated)):
        tokens = torch.tensor([prompt + generated[:t]])
        logp += model(tokens, torch.tensor([row])).log_softmax(-1)[0, generated[t]].item()
    return logp / len(generated) ** length_penalty


def exhaustive_best(model, prompt: list[int], row: int, V: int, max_length: int, length_penalty: float) -> float:
    """The best score over every sequence: ended by END at any length, or unfinished at max_length."""
    best = -math.inf

    def visit(generated: list[int], logp: float) -> None:
        nonlocal best
        step = model(torch.tensor([prompt + generated]), torch.tensor([row])).log_softmax(-1)[0].tolist()
        for token in range(V):
            seq = generated + [token]
            if token == END or len(seq) == max_length:
                best = max(best, (logp + step[token]) / len(seq) ** length_penalty)
            else:
                visit(seq, logp + step[token])

    visit([], 0.0)
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
def test_beam_search_with_every_hypothesis_is_exhaustive_search(length_penalty):
    B, V, max_length = 3, 5, 4
    for seed in range(3):
        model = toy_model(V, B, seed, scale=1.5)
        decoding = Decoding("beam", max_length=max_length, beams=V**max_length, length_penalty=length_penalty)
        out = generate(model, prompts(B), END, PAD, decoding)
        for b in range(B):
            generated = out[b, 1:].tolist()
            generated = generated[: generated.index(END) + 1] if END in generated else generated
            assert all(token == PAD for token in out[b, 1 + len(generated):].tolist())
            found = score(model, prompts(B)[b].tolist(), b, generated, length_penalty)
            best = exhaustive_best(model, prompts(B)[b].tolist(), b, V, max_length, length_penalty)
            assert found == pytest.approx(best, abs=1e-5), (seed, b, generated)


def reference_beam_search(model, prompt: list[int], row: int, V: int, beams: int, max_length: int,
                          length_penalty: float) -> float:
    """The definition, one item at a time and without stopping early: the best score found."""
    live, finished = [([], 0.0)], []
    for t in range(1, max_length + 1):
        extended = []
        for generated, logp in live:
            step = model(torch.tensor([prompt + generated]), torch.tensor([row])).log_softmax(-1)[0].tolist()
            extended += [(generated + [token], logp + step[token]) for token in range(V)]
        extended.sort(key=lambda e: -e[1])
        finished += [logp / t**length_penalty for generated, logp in extended[:beams] if generated[-1] == END]
        live = [e for e in extended if e[0][-1] != END][:beams]
    return max(finished + [logp / max_length**length_penalty for _, logp in live])


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0, 2.0, -0.5])
def test_beam_search_is_its_definition_and_stopping_early_changes_nothing(length_penalty):
    B, V, max_length, steps, early = 4, 6, 7, [], []
    for seed in range(3):
        model = toy_model(V, B, seed, scale=2.0, end_bias=1.5)

        def counted(tokens, rows):
            steps.append(tokens.shape[1] - 1)
            return model(tokens, rows)

        for beams in (2, 3):
            decoding = Decoding("beam", max_length=max_length, beams=beams, length_penalty=length_penalty)
            steps.clear()
            out = generate(counted, prompts(B), END, PAD, decoding)
            early.append(len(steps) < max_length)
            for b in range(B):
                generated = [token for token in out[b, 1:].tolist() if token != PAD]
                found = score(model, prompts(B)[b].tolist(), b, generated, length_penalty)
                wanted = reference_beam_search(model, prompts(B)[b].tolist(), b, V, beams, max_length,
                                               length_penalty)
                assert found == pytest.approx(wanted, abs=1e-5), (seed, beams, b, generated)
    if length_penalty == 0:
        assert any(early)  # the bound was put to the test


X, Y, Z = 2, 3, 4  # tokens of the scripted models below (V = 5, with 0 as the prompt and END = 1)


def scripted(probabilities):
    """next_logits from `probabilities(generated) -> {token: p}`; tokens it leaves out get about 1e-13."""
    def next_logits(tokens, rows):
        logits = torch.full((len(rows), 5), -30.0)
        for i, generated in enumerate(tokens[:, 1:].tolist()):
            for token, p in probabilities(generated).items():
                logits[i, token] = math.log(p)
        return logits

    return next_logits


@pytest.mark.parametrize("length_penalty, beams, max_length, probabilities, best", [
    # long favoured: [END] (log 0.7 = -0.36) finishes first; X X ... unfinished at 8 scores log 0.3 / 8 = -0.15
    (1.0, 1, 8, lambda g: {X: 1.0} if g else {END: 0.7, X: 0.3}, [X] * 8),
    # short favoured (score log p * length ** 2): [END] -2.81 and [X, END] -12.9 finish first, yet the live [Y, Z]
    # can still end as -0.95, though not with the length of max_length (-15.2)
    (-2.0, 2, 12, lambda g: {(): {Y: 0.9, END: 0.06, X: 0.04}, (Y,): {Z: 1.0}}.get(tuple(g), {END: 1.0}),
     [Y, Z, END]),
])
def test_stopping_early_waits_for_what_a_live_hypothesis_can_still_reach(length_penalty, beams, max_length,
                                                                        probabilities, best):
    decoding = Decoding("beam", max_length=max_length, beams=beams, length_penalty=length_penalty)
    out = generate(scripted(probabilities), torch.zeros(1, 1, dtype=torch.long), END, PAD, decoding)
    assert out[0, 1:].tolist() == best


def test_one_beam_without_length_penalty_is_greedy():
    B, V = 6, 8
    for seed in range(4):
        model = toy_model(V, B, seed)
        greedy = generate(model, prompts(B), END, PAD, Decoding(max_length=15))
        beam = generate(model, prompts(B), END, PAD, Decoding("beam", max_length=15, beams=1, length_penalty=0))
        assert torch.equal(beam, greedy)


@pytest.mark.parametrize("strategy", ["top_k", "top_p"])
def test_a_seed_gives_the_same_samples_and_another_seed_others(strategy):
    model = toy_model(10, 8, seed=0, scale=0.5)
    decoding = Decoding(strategy, max_length=12, top_k=10, top_p=0.95)
    runs = [generate(model, prompts(8), END, PAD, decoding, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("strategy", [*SAMPLING, "beam"])
def test_ended_sequences_are_padded_and_generation_stops_when_all_have_ended(strategy):
    B, T0, V = 4, 2, 6

    def ends_after_its_row(tokens, rows):  # item i: i tokens, then END
        logits = torch.zeros(len(rows), V)
        logits[:, 3] = 2.0
        due = tokens.shape[1] - T0 >= rows
        logits[:, END] = torch.where(due, 50.0, -50.0)
        return logits

    decoding = Decoding(strategy, max_length=20)
    out = generate(ends_after_its_row, prompts(B, T0), END, PAD, decoding, torch.Generator().manual_seed(0))
    assert out.shape == (B, T0 + B)
    assert torch.equal(out[:, :T0], prompts(B, T0))
    for i in range(B):
        assert out[i, T0 + i] == END
        assert not (out[i, T0: T0 + i] == END).any() and not (out[i, T0: T0 + i] == PAD).any()
        assert (out[i, T0 + i + 1:] == PAD).all()


@pytest.mark.parametrize("strategy", [*SAMPLING, "beam"])
def test_generation_stops_at_max_length(strategy):
    B, T0, V = 3, 2, 6

    def never_ends(tokens, rows):
        logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(tokens.shape[1]))
        logits[:, END] = -50.0
        return logits

    out = generate(never_ends, prompts(B, T0), END, PAD, Decoding(strategy, max_length=5, beams=3))
    assert out.shape == (B, T0 + 5) and out.dtype == torch.long
    assert not ((out == END) | (out == PAD)).any()


@pytest.mark.parametrize("decoding, kept", [
    (Decoding("top_k", top_k=2), [0.5 / 0.75, 0.25 / 0.75, 0, 0, 0]),
    (Decoding("top_p", top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0]),  # 0.5 + 0.25 < 0.8
    (Decoding("top_k", top_k=5, temperature=2.0), None),  # softmax(log p / 2): p ** 0.5 normalised
])
def test_sampling_frequencies_match_the_filtered_distribution(decoding, kept):
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    expected = torch.tensor(kept) if kept else p.sqrt() / p.sqrt().sum()
    draws = sample_next(p.log().expand(2000, 5), decoding, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=5) / 2000
    assert (frequencies[expected == 0] == 0).all()
    assert (frequencies - expected).abs().max() < 0.04, frequencies  # ~ 3.5 binomial standard deviations


@pytest.mark.parametrize("setting, named", [
    (dict(strategy="nucleus"), "strategy"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(top_k=0), "top_k"), (dict(temperature=-0.5), "temperature"),
    (dict(beams=0), "beams"), (dict(max_length=0), "max_length"),
])
def test_a_bad_setting_is_one_sentence(setting, named):
    with pytest.raises(UserError) as caught:
        generate(toy_model(4, 1, 0), prompts(1), END, PAD, Decoding(**setting))
    message = str(caught.value)
    assert named in message and message.endswith(".") and ". " not in message and "\n" not in message
    Decoding().check()  # the defaults pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("strategy", [*SAMPLING, "beam"])
def test_on_the_gpu_as_on_the_cpu(strategy):
    model = toy_model(8, 4, seed=0)
    on_gpu = lambda tokens, rows: model(tokens.cpu(), rows.cpu()).cuda()  # noqa: E731
    decoding = Decoding(strategy, max_length=10)
    runs = [generate(on_gpu, prompts(4).cuda(), END, PAD, decoding, torch.Generator("cuda").manual_seed(0))
            for _ in range(2)]
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])
    if strategy in ("greedy", "beam"):
        assert torch.equal(runs[0].cpu(), generate(model, prompts(4), END, PAD, decoding))
