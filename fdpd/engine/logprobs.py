"""Logprobs beyond the chosen token's: the top-k alternatives of each sampled token, and the
logprobs of the prompt's own tokens (vLLM's ``prompt_logprobs``, what ``echo`` shows).

Every value is the log_softmax of the raw logits (the model's temperature-1 distribution), as
the sampler's chosen-token logprob is, so all three agree for the same token. Computed only for
the rows that ask, from logits tensors the engine already has; nothing here touches the hot path
of a request that does not ask.

Results are :class:`fdpd.outputs.TokenLogprobs` (torch-free: the router reads them too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fdpd.outputs import TokenLogprobs


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int],
                   num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Row ``i`` of ``logits`` ([R, V], V = the vocabulary) scored at ``token_ids[i]``, with
    its ``num_top[i]`` best alternatives."""
    rows = len(token_ids)
    if logits.dim() != 2 or logits.shape[0] != rows or len(num_top) != rows:
        raise ValueError(f"logits: expected [{rows}, V] for {rows} tokens, got "
                         f"{list(logits.shape)} and {len(num_top)} top-k counts")
    if not rows:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_ids = torch.tensor(list(token_ids), dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, chosen_ids.unsqueeze(1))
    ranks = (logp > chosen).sum(dim=-1) + 1
    k = max(num_top)
    chosen_l, ranks_l = chosen.squeeze(1).tolist(), ranks.tolist()
    if k:
        top_values, top_ids = logp.topk(k, dim=-1)
        ids_l, values_l = top_ids.tolist(), top_values.tolist()
    else:
        ids_l = values_l = [[] for _ in range(rows)]
    return [TokenLogprobs(int(token_ids[i]), chosen_l[i], ranks_l[i],
                          tuple(ids_l[i][:num_top[i]]), tuple(values_l[i][:num_top[i]]))
            for i in range(rows)]


def prompt_logprobs(logits: torch.Tensor, token_ids: Sequence[int], start: int,
                    num_prompt_tokens: int, have: int, num_top: int
                    ) -> list[TokenLogprobs]:
    """The prompt logprobs a chunk's logits give: ``logits`` [n, V] are the rows of positions
    ``start..start+n-1`` of a sequence whose tokens are ``token_ids`` (all of them), and row j
    predicts the token at ``start + j + 1``. Returns the entries of prompt positions from
    ``have`` (how many the request holds already, the first prompt token's None included) up
    to the prompt's end, or fewer if the chunk ends first; [] if the chunk adds none."""
    first = max(have, start + 1)
    last = min(start + logits.shape[0] + 1, num_prompt_tokens)    # exclusive
    if first >= last or first != have:
        return []
    rows = logits[first - 1 - start:last - 1 - start]
    return token_logprobs(rows, token_ids[first:last], [num_top] * (last - first))


def split_step_logits(logits: torch.Tensor, scheduled: Sequence[tuple[object, int]],
                      all_logits: Sequence[bool], needs_logits: Sequence[bool],
                      vocab_size: int) -> torch.Tensor:
    """For a step where some items asked for ``all_logits``: add each such request's new
    prompt logprobs to ``req.prompt_logprobs`` and return the sampling rows only (one per item
    with ``needs_logits``, in order), as a step without prompt logprobs returns them.

    ``scheduled`` pairs each request (before ``advance``) with its token count this step."""
    keep: list[int] = []
    row = 0
    for (req, n), every, sample in zip(scheduled, all_logits, needs_logits):
        if every:
            start = req.num_computed_tokens
            params = req.sampling_params
            req.prompt_logprobs.extend(prompt_logprobs(
                logits[row:row + n, :vocab_size], req.all_token_ids, start,
                req.num_prompt_tokens, len(req.prompt_logprobs), params.prompt_logprobs))
            row += n
            if sample:
                keep.append(row - 1)
        elif sample:
            keep.append(row)
            row += 1
    return logits.index_select(0, torch.tensor(keep, dtype=torch.long, device=logits.device))


def sampled_logprobs(logits: torch.Tensor, token_ids: Sequence[int],
                     num_top: Sequence[int | None], vocab_size: int
                     ) -> list[TokenLogprobs | None]:
    """Per sampled row: its token's logprobs with ``num_top`` alternatives, or None for a row
    that did not ask (``num_top`` None)."""
    asked = [i for i, k in enumerate(num_top) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(token_ids)
    if not asked:
        return out
    index = torch.tensor(asked, dtype=torch.long, device=logits.device)
    rows = logits.index_select(0, index)[:, :vocab_size]
    for i, entry in zip(asked, token_logprobs(rows, [token_ids[i] for i in asked],
                                              [num_top[i] for i in asked])):
        out[i] = entry
    return out
