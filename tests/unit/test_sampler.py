from __future__ import annotations

import math
import random

import pytest
import torch

from fdpd.engine.sampler import Sampler, SamplingRow, _splitmix64, mix_seed, uniform_for
from fdpd.sampling_params import SamplingParams

V = 64
GREEDY = SamplingParams(temperature=0.0)


def row(params: SamplingParams = GREEDY, *, seed: int = 0, position: int = 10,
        prompt: tuple[int, ...] = (1, 2, 3), output: tuple[int, ...] = (),
        eos: tuple[int, ...] = (0,)) -> SamplingRow:
    return SamplingRow(params=params, seed=seed, position=position, prompt_token_ids=prompt,
                       output_token_ids=output, eos_token_ids=eos)


def random_logits(batch: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


def frequencies(logits: torch.Tensor, params: SamplingParams, n: int = 20000) -> torch.Tensor:
    vocab = logits.shape[-1]
    rows = [row(params, seed=s, position=5) for s in range(n)]
    out = Sampler(vocab).sample(logits.expand(n, vocab), rows)
    return torch.bincount(torch.tensor(out.token_ids), minlength=vocab).double() / n


def test_greedy_equals_argmax_batched():
    logits = random_logits(16)
    out = Sampler(V).sample(logits, [row() for _ in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_top_k_1_equals_greedy():
    logits = random_logits(8)
    rows = [row(SamplingParams(temperature=0.9, top_k=1), seed=s) for s in range(8)]
    assert Sampler(V).sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_padded_vocab_columns_never_chosen():
    logits = torch.zeros(2, V + 16)
    logits[:, V:] = 100.0
    out = Sampler(V).sample(logits, [row(), row(SamplingParams(), seed=3)])
    assert all(t < V for t in out.token_ids)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="logits"):
        Sampler(V).sample(torch.zeros(3, V), [row()])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(V).sample(torch.zeros(1, V - 1), [row()])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(0)


def test_seed_mix_is_fixed_and_in_range():
    # Pinned values: P and D (and future versions) must agree on the draw for (seed, position).
    # splitmix64 reference stream from state 0: E220A8397B1DCDAF, 6E789E6AA1B965F4, ...
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert mix_seed(0, 0) == _splitmix64(0xE220A8397B1DCDAF) >> 1 == 6017775124710473527
    assert mix_seed(1234, 17) == 3841169180889139171
    assert all(0 <= mix_seed(s, p) < 2**63 for s in (0, 1, 2**63 - 1) for p in (0, 1, 10**6))
    assert len({mix_seed(7, p) for p in range(1000)}) == 1000
    assert all(0.0 <= uniform_for(s, p) < 1.0 for s in range(50) for p in range(50))


def test_seeded_sampling_independent_of_batch_composition_and_order():
    sampler = Sampler(V)
    target_logits = random_logits(1, seed=1)
    target_params = SamplingParams(temperature=0.8, top_p=0.95, top_k=20, min_p=0.01,
                                   repetition_penalty=1.2, frequency_penalty=0.3)
    target = row(target_params, seed=1234, position=17, output=(5, 5, 9))
    alone = sampler.sample(target_logits, [target]).token_ids[0]
    assert sampler.sample(target_logits.clone(), [target]).token_ids[0] == alone

    rng = random.Random(0)
    for trial in range(5):
        others = [row(SamplingParams(temperature=rng.choice([0.0, 0.5, 1.3]),
                                     top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.5]),
                                     min_p=rng.choice([0.0, 0.2]),
                                     presence_penalty=rng.choice([0.0, 1.0]), min_tokens=2),
                      seed=rng.randrange(2**63), position=rng.randrange(100), output=(3,))
                  for _ in range(31)]
        logits = random_logits(32, seed=100 + trial)
        at = rng.randrange(32)
        logits[at] = target_logits[0]
        rows = others[:at] + [target] + others[at:]
        assert sampler.sample(logits, rows).token_ids[at] == alone


def test_different_positions_give_different_draws():
    logits = torch.zeros(200, V)  # uniform: every draw is decided by the uniform alone
    rows = [row(SamplingParams(), seed=99, position=p) for p in range(200)]
    tokens = Sampler(V).sample(logits, rows).token_ids
    assert len(set(tokens)) > 40
    other_seed = [row(SamplingParams(), seed=100, position=p) for p in range(200)]
    assert Sampler(V).sample(logits, other_seed).token_ids != tokens


def test_empirical_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    for temperature in (1.0, 0.5):
        freq = frequencies(logits, SamplingParams(temperature=temperature))
        expected = torch.softmax(logits.double() / temperature, -1)
        assert torch.allclose(freq, expected, atol=0.015), (temperature, freq, expected)


def test_top_k_renormalises_over_the_k_best():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    freq = frequencies(logits, SamplingParams(top_k=3))
    kept = torch.tensor([0, 1, 6])
    assert freq.sum() == pytest.approx(freq[kept].sum())
    expected = torch.softmax(logits[kept].double(), -1)
    assert torch.allclose(freq[kept], expected, atol=0.015)


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    freq = frequencies(logits, SamplingParams(top_p=0.75))  # {0, 1} has mass 0.8 >= 0.75
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.015)
    freq = frequencies(logits, SamplingParams(top_p=0.85))  # needs token 2 as well
    assert freq[2] > 0 and freq[3] == 0
    freq = frequencies(logits, SamplingParams(top_p=0.3))  # the best token alone
    assert freq[0] == 1.0


def reference_top_k_top_p(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
    x = x.clone()
    if 0 < k < x.shape[-1]:
        x[x < x.sort(descending=True).values[k - 1]] = -math.inf
    if p < 1.0:
        values = x.sort(descending=True).values
        cum = torch.softmax(values, -1).cumsum(-1)
        first = int((cum >= p).nonzero()[0]) if bool((cum >= p).any()) else len(values) - 1
        x[x < values[first]] = -math.inf
    return x


@pytest.mark.parametrize("vocab", [64, 4096])  # 4096: nucleus wider than the 1024 candidates
def test_top_k_top_p_mask_matches_reference(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g) * torch.tensor([[0.01], [0.1], [1], [3], [8], [1]])
    x -= x.amax(-1, keepdim=True)
    settings = [(0, 0.9), (0, 0.99), (40, 0.5), (vocab - 1, 0.95), (5, 1.0), (2000, 0.999)]
    top_k = [k if k > 0 else vocab for k, _ in settings]
    top_p = [p for _, p in settings]
    got = Sampler(vocab)._top_k_top_p(x.clone(), top_k, top_p, torch.tensor(top_k)[:, None],
                                       torch.tensor(top_p)[:, None])
    for i, (k, p) in enumerate(settings):
        assert torch.equal(got[i], reference_top_k_top_p(x[i], k, p)), (vocab, k, p)


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    freq = frequencies(probs.log(), SamplingParams(min_p=0.2))  # floor 0.1
    assert freq[3] == 0 and freq[4] == 0 and freq[2] > 0
    assert freq[0] == pytest.approx(0.5 / 0.92, abs=0.015)


def test_penalties_change_exactly_the_expected_tokens():
    raw = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    r = row(params, prompt=(0, 1), output=(2, 2, 1), eos=())
    processed = Sampler(6).process_logits(raw, [r])
    # seen = {0, 1, 2}: 2 -> 1, -1 -> -2, 0.5 -> 0.25; then over output tokens only:
    # token 1 (count 1): -2 - 0.25 - 0.5; token 2 (count 2): 0.25 - 0.5 - 0.5.
    expected = torch.tensor([[1.0, -2.75, -0.75, 3.0, -2.0, 0.0]])
    assert torch.equal(processed, expected)
    assert torch.equal(raw, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]]))  # input untouched


def test_penalties_batched_rows_do_not_leak():
    raw = torch.zeros(3, 6) + 1.0
    rows = [row(SamplingParams(frequency_penalty=1.0), prompt=(0,), output=(4, 4), eos=()),
            row(GREEDY, prompt=(0,), output=(4,), eos=()),
            row(SamplingParams(repetition_penalty=4.0), prompt=(5,), output=(3,), eos=())]
    processed = Sampler(6).process_logits(raw, rows)
    assert processed[0].tolist() == [1.0, 1.0, 1.0, 1.0, -1.0, 1.0]
    assert processed[1].tolist() == [1.0] * 6
    assert processed[2].tolist() == [1.0, 1.0, 1.0, 0.25, 1.0, 0.25]


def test_penalty_flips_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.5)
    assert Sampler(4).sample(logits, [row(params, output=(0,), eos=())]).token_ids == [1]
    assert Sampler(4).sample(logits, [row(params, output=(), eos=())]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]])  # eos 0, stop id 1 are the best
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    sampler = Sampler(4)
    assert sampler.sample(logits, [row(params, output=(), eos=(0,))]).token_ids == [2]
    assert sampler.sample(logits, [row(params, output=(3,), eos=(0,))]).token_ids == [2]
    assert sampler.sample(logits, [row(params, output=(3, 3), eos=(0,))]).token_ids == [0]
    ignore = SamplingParams(temperature=0, ignore_eos=True)
    assert sampler.sample(logits, [row(ignore, output=(), eos=(0,))]).token_ids == [0]


def test_min_tokens_masks_random_rows_too():
    logits = torch.tensor([8.0, 8.0, 0.0, 0.0]).expand(500, 4)
    params = SamplingParams(min_tokens=1, stop_token_ids=[1])
    rows = [row(params, seed=s, eos=(0,)) for s in range(500)]
    tokens = Sampler(4).sample(logits, rows).token_ids
    assert 0 not in tokens and 1 not in tokens


def test_logprobs_are_raw_log_softmax_of_chosen():
    logits = random_logits(6)
    rows = [row(SamplingParams(logprobs=1, temperature=0.7, repetition_penalty=1.5), seed=s,
                output=(1, 2)) for s in range(3)]
    rows += [row(SamplingParams(temperature=0, logprobs=0)), row(), row(SamplingParams(top_k=3))]
    out = Sampler(V).sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    expected = [raw[i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-6)
    greedy = Sampler(V).sample(logits[:1], [row(SamplingParams(temperature=0, logprobs=1))])
    assert greedy.logprobs == pytest.approx([raw[0].max().item()], abs=1e-6)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=1e-6),
    SamplingParams(top_p=1e-9),
    SamplingParams(min_p=1.0),
    SamplingParams(top_k=5, top_p=0.5, min_p=0.9, temperature=0.01),
    SamplingParams(temperature=0),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=2, min_tokens=3),
])
def test_extreme_logits_always_give_a_valid_token(params):
    inf = math.inf
    logits = torch.full((7, 8), -inf)
    logits[0, 5] = 0.0                         # one finite candidate
    logits[1] = torch.tensor([1e30, -1e30, 1e30, 0, 0, 0, 0, 0])
    logits[2, 3] = inf                         # +inf logit
    logits[3] = torch.tensor([3.4e38] * 8)     # near float32 max everywhere
    logits[4, 6] = math.nan                    # NaN among -inf
    # row 5 stays all -inf
    logits[6] = torch.tensor([1e-30] * 4 + [-3.4e38] * 4)
    rows = [row(params, seed=s, position=s, prompt=(5, 3), output=(2,), eos=(7,))
            for s in range(7)]
    out = Sampler(8).sample(logits, rows)
    assert all(0 <= t < 8 for t in out.token_ids)
    assert out.token_ids[0] == 5
    assert out.token_ids[1] in (0, 2)
    assert out.token_ids[2] == 3
    assert out.token_ids[6] < 4


def test_all_greedy_fast_path_agrees_with_general_path():
    logits = random_logits(32)
    plain = Sampler(V).sample(logits, [row() for _ in range(32)]).token_ids
    # A single random row forces the general path for the whole batch.
    mixed = Sampler(V).sample(logits, [row() for _ in range(31)] + [row(SamplingParams())])
    assert mixed.token_ids[:31] == plain[:31]
