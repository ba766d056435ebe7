"""Batched token sampler shared by every engine role (prefill, decode, mixed).

Processing order for one step, per row:

1. Penalties, on a copy of the logits. Repetition penalty (HF/vLLM): for every token seen in
   prompt + output, a positive logit is divided by the penalty and a negative one multiplied by it.
   Then frequency and presence penalties (OpenAI), over OUTPUT tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
2. min_tokens: while ``len(output) < min_tokens`` the row's EOS ids and ``stop_token_ids`` are set
   to -inf. ``ignore_eos`` masks nothing here; the engine simply does not stop on EOS.
   Steps 1-2 give the *processed* logits (:meth:`Sampler.process_logits`).
3. Greedy rows (temperature 0 or top_k 1) take the argmax of the processed logits.
4. Random rows: temperature, top-k, top-p, min-p, then one inverse-CDF draw.

Reproducibility: a random row's draw depends only on (seed, position) and its logits, never on the
batch it sits in or on a process-local RNG stream, because in PD mode the prefill instance samples
the first token and the decode instance the rest (DESIGN.md 3.7). Each row gets one uniform
``u = mix_seed(seed, position) / 2**63`` (53 significant bits), computed in pure Python with a
splitmix64 mix, so it is identical on every device and process. The token is the first index whose
cumulative probability (float64) exceeds ``u * total``: exact inverse-CDF sampling, one batched
``searchsorted`` for all rows, no per-row generators or kernel launches, and a token whose
probability is exactly 0 (masked) can never be returned. All other ops are row-wise, so a row gives
the same token alone or inside any batch.

No NaN ever: if a random row's distribution is unusable (every candidate masked, +inf or NaN
logits) the row falls back to the argmax of its processed logits.

Logprobs (only when some row asks) are the log_softmax of the raw logits, i.e. the model's
unprocessed temperature-1 distribution, at the chosen token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fdpd.model import native
from fdpd.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_UNIFORM_SCALE = 2.0**-53
# Candidates searched for the top-p nucleus before falling back to a full-vocab sort.
_TOP_P_CANDIDATES = 1024


def _splitmix64(x: int) -> int:
    """splitmix64 (Steele, Lea, Flood 2014): a bijection on 64-bit ints with good avalanche."""
    z = (x + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(seed: int, position: int) -> int:
    """The 63-bit seed of the draw at ``position`` of a request seeded ``seed``.

    ``splitmix64((splitmix64(seed) + position) mod 2**64) >> 1``: distinct positions of one
    request give distinct values (splitmix64 is a bijection); the result is in [0, 2**63).
    """
    return _splitmix64((_splitmix64(seed & _MASK64) + position) & _MASK64) >> 1


def uniform_for(seed: int, position: int) -> float:
    """The uniform in [0, 1) used for the draw at ``position``: the top 53 bits of the mix."""
    return (mix_seed(seed, position) >> 10) * _UNIFORM_SCALE


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs to know about one request at one step."""

    params: SamplingParams
    seed: int  # the request's seed, or one the engine assigned at admission
    position: int  # index in the full sequence of the token being generated
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: tuple[int, ...]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Logprob of each chosen token under the raw (temperature-1) distribution; None if no row
    # asked. When some row asked, every row gets a value.
    logprobs: list[float] | None


class Sampler:
    """Turns a batch of logits ``[B, V]`` into one token per row (see the module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu",
                 native_kernels: bool = True):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size: must be a positive integer, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # The greedy pick as fdpd.model.native's kernel, unless the plain path is asked for.
        self._native = native_kernels and native.available(self.device)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        logits = self._check_logits(logits, rows)
        any_logprobs = any_processing = False
        random: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            if p.logprobs is not None:
                any_logprobs = True
            if not p.greedy:
                random.append(i)
            if p.has_penalties or len(row.output_token_ids) < p.min_tokens:
                any_processing = True
        processed = self.process_logits(logits, rows) if any_processing else logits
        # Greedy rows, and the fallback of random rows whose distribution is unusable. NaN logits
        # (a model bug) win torch.max, which still yields a valid token id. max(dim) gives the
        # first maximal index like argmax; the native kernel gives the same index, ~15x faster
        # on CPU (a [32, 32000] row block: ~0.1 vs 1.6 ms, once per step).
        chosen = (native.greedy_pick(processed) if self._native
                  else processed.max(dim=-1).indices)
        if random:
            index = torch.tensor(random, device=self.device)
            chosen[index] = self._sample_random(processed, [rows[i] for i in random], index,
                                                chosen[index])
        logprobs = None
        if any_logprobs:
            raw = torch.log_softmax(logits, dim=-1)
            logprobs = raw.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        return SamplerOutput(token_ids=chosen.tolist(), logprobs=logprobs)

    def _check_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits: expected shape [{len(rows)}, >={self.vocab_size}] for "
                             f"{len(rows)} rows, got {list(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits: {logits.shape[1]} columns < vocab_size {self.vocab_size}")
        # Models may pad the vocabulary; padded columns must never be sampled.
        logits = logits[:, : self.vocab_size]
        return logits.to(device=self.device, dtype=torch.float32)

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Penalties then the min_tokens mask, on a copy; the input is left untouched."""
        out = logits.clone()
        penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
        if penalised:
            self._apply_penalties(out, [rows[i] for i in penalised], penalised)
        self._apply_min_tokens(out, rows)
        return out

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            return ids.to(device=self.device, dtype=torch.long).flatten()
        return torch.tensor(list(ids), dtype=torch.long, device=self.device)

    def _scatter_index(self, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) index pairs for a list of id tensors, out-of-vocab ids dropped."""
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        row_idx = torch.repeat_interleave(torch.arange(len(seqs), device=self.device), lengths)
        tok_idx = torch.cat(seqs)
        keep = (tok_idx >= 0) & (tok_idx < self.vocab_size)
        return row_idx[keep], tok_idx[keep]

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow],
                         index: list[int]) -> None:
        n, vocab = len(rows), logits.shape[1]
        dev = self.device
        idx = torch.tensor(index, device=dev)
        sub = logits[idx]
        outputs = [self._ids(r.output_token_ids) for r in rows]
        # One host->device copy for the per-row scalars; the any() checks stay on the host so the
        # step does not wait for the device.
        params = [(r.params.repetition_penalty, r.params.frequency_penalty,
                   r.params.presence_penalty) for r in rows]
        table = torch.tensor(params, dtype=torch.float32, device=dev)
        if any(rep != 1.0 for rep, _, _ in params):
            seen_ids = [torch.cat([self._ids(r.prompt_token_ids), o])
                        for r, o in zip(rows, outputs)]
            seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
            seen[self._scatter_index(seen_ids)] = True
            # A row with penalty 1 divides/multiplies by exactly 1: unchanged, bit for bit.
            rep = table[:, 0:1]
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        if any(freq != 0.0 or presence != 0.0 for _, freq, presence in params):
            counts = torch.zeros(n, vocab, dtype=torch.float32, device=dev)
            rows_i, toks = self._scatter_index(outputs)
            counts.index_put_((rows_i, toks), torch.ones_like(toks, dtype=torch.float32),
                              accumulate=True)
            sub = sub - table[:, 1:2] * counts - table[:, 2:3] * (counts > 0).to(torch.float32)
        logits[idx] = sub

    def _apply_min_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            if len(row.output_token_ids) < p.min_tokens:
                for t in (*row.eos_token_ids, *p.stop_token_ids):
                    if 0 <= t < self.vocab_size:
                        row_idx.append(i)
                        tok_idx.append(t)
        if row_idx:
            logits[torch.tensor(row_idx, device=self.device),
                   torch.tensor(tok_idx, device=self.device)] = -torch.inf

    def _sample_random(self, processed: torch.Tensor, rows: list[SamplingRow],
                       index: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        dev, vocab = self.device, processed.shape[1]
        x = processed[index]  # a copy: the in-place steps below never touch the caller's logits
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        top_p = [r.params.top_p for r in rows]
        min_p = [r.params.min_p for r in rows]
        # One host->device copy for every per-row scalar (float64 holds ints < 2**53 exactly).
        table = torch.tensor(
            [(r.params.temperature, k, p, m, uniform_for(r.seed, r.position))
             for r, k, p, m in zip(rows, top_k, top_p, min_p)],
            dtype=torch.float64, device=dev)
        # Subtracting the row max first keeps x <= 0 with the best token at exactly 0: a tiny
        # temperature cannot overflow, and exp(x) needs no normalisation.
        x.sub_(x.amax(dim=-1, keepdim=True)).div_(table[:, 0:1].to(torch.float32))
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            x = self._top_k_top_p(x, top_k, top_p, table[:, 1:2].long(),
                                  table[:, 2:3].to(torch.float32))
        if any(m > 0 for m in min_p):
            # p_i / p_max = exp(x_i) since the best token sits at 0 (top-k/top-p always keep it),
            # so "p_i < min_p * p_max" is "x_i < log(min_p)"; log(0) = -inf masks nothing.
            x.masked_fill_(x < table[:, 3:4].to(torch.float32).log(), -torch.inf)
        # Unnormalised weights and their float64 running sum: monotone, so a token of weight 0
        # (masked) owns an empty interval and is never picked.
        cdf = x.to(torch.float64).exp_().cumsum_(dim=-1)
        total = cdf[:, -1:]
        u = table[:, 4]
        picked = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
        # u * total can round up to total; then nothing is > target and the index runs off the end.
        picked.clamp_(max=vocab - 1)
        upper = cdf.gather(1, picked)
        lower = torch.where(picked > 0, cdf.gather(1, (picked - 1).clamp_(min=0)), 0.0)
        total = total.squeeze(1)
        usable = torch.isfinite(total) & (total > 0) & (upper.squeeze(1) > lower.squeeze(1))
        return torch.where(usable, picked.squeeze(1), fallback)

    def _top_k_top_p(self, x: torch.Tensor, top_k: list[int], top_p: list[float],
                     k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Mask x (in place) to the top-k, then the top-p nucleus, of each row.

        Cuts are thresholds on values, never on sorted positions: a token tied with the last kept
        one is kept too, so the result does not depend on how a sort orders ties. ``top_k`` and
        ``top_p`` are the host copies of ``k`` and ``p`` ([R, 1] on the device). A full-vocab
        sort is slow (seconds on CPU for a 128k vocab batch), so the nucleus is looked for among
        the best ``_TOP_P_CANDIDATES`` values and only rows whose nucleus is wider get a sort.
        """
        dev, vocab = self.device, x.shape[1]
        limited = [k for k in top_k if k < vocab]
        if limited:
            best = x.topk(max(limited), dim=-1).values
            kth = best.gather(1, k.clamp(max=best.shape[1]) - 1)
            x.masked_fill_((x < kth) & (k < vocab), -torch.inf)
        nucleus = [i for i, p in enumerate(top_p) if p < 1.0]
        if not nucleus:
            return x
        index = torch.tensor(nucleus, device=dev)
        sub = x[index]
        p = p[index]
        # x <= 0 with the best token at 0, so exp cannot overflow and the sum is >= 1.
        total = sub.exp().sum(dim=-1, keepdim=True)
        values = sub.topk(min(vocab, _TOP_P_CANDIDATES), dim=-1).values
        cut = self._nucleus_cut(values, total, p)
        wide = torch.isnan(cut.squeeze(1)).nonzero().squeeze(1)
        if wide.numel():
            full = sub[wide].sort(dim=-1, descending=True).values
            cut[wide] = self._nucleus_cut(full, total[wide], p[wide])
            # Never reached (rounding with top_p ~ 1, or NaN logits): keep the whole row.
            cut = torch.where(torch.isnan(cut), -torch.inf, cut)
        x[index] = sub.masked_fill_(sub < cut, -torch.inf)
        return x

    @staticmethod
    def _nucleus_cut(values: torch.Tensor, total: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Smallest value of the shortest prefix of ``values`` (descending) whose probability
        mass reaches p, as [R, 1]; NaN where the given values do not reach p."""
        reached = (values.exp() / total).cumsum(dim=-1) >= p
        first = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)
        cut = values.gather(1, first)
        return torch.where(reached.any(dim=-1, keepdim=True), cut, torch.nan)
