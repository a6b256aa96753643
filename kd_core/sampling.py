"""Sampled mode's draws: N ids per row from the teacher's softmax at temperature 1, the same bytes anywhere.

A row's draws are a pure function of its float32 logits and of (sample_index, position, draw number), never of
the batch, the padding or the chunk the row was computed in, so a resumed run writes the bytes an uninterrupted
one does. Every step after the float32 probabilities is integer arithmetic, which CPU and CUDA do identically:

  random bits  a counter-based hash (lowbias32, chained over the words of the key) of (sample_index, position,
               draw), twice with different salts -> 62 random bits per draw, in int64 without overflow;
  CDF          p = exp(logit - logsumexp) in float32, scaled to integers q = floor(p * 2**40) and summed in int64:
               exact and order-independent (a float cumsum's rounding depends on the kernel and the device);
  draw         u = 53 of those bits as a float64 in [0, 1); target = floor(u * total), one IEEE float64 multiply
               (correctly rounded on every device); the id whose CDF interval [cdf[i-1], cdf[i]) holds the
               target, by searchsorted. Scaling u (not `bits mod total`) keeps a draw stable when a row's logits
               move by an ulp (another batch's padding does that): the target moves by a few units of 2**-40.

Bias, far below the float16 rounding of a cached log-prob: floor drops < 2**-40 per id (at most 1.4e-7 of the
mass at a 152k vocabulary; ids under 2**-40 are never drawn).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
CDF_SCALE = 2**40  # probability -> integer CDF units; p < 2**-40 is never drawn
_SALTS = (0x243F6A88, 0x85A308D3)  # two independent 32-bit streams (digits of pi): 62 bits per draw
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): c split in 16-bit halves so no product passes 2**48."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a 32-bit bijection with full avalanche; x in [0, 2**32) as int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    return _mix32((h + word + _GOLDEN) & _MASK32)


def random_bits(sample_index: torch.Tensor, position: torch.Tensor, draws: int) -> torch.Tensor:
    """(n,) int64 keys -> (n, draws) int64 uniform in [0, 2**62): one value per (sample_index, position, draw)."""
    draw = torch.arange(draws, device=sample_index.device, dtype=torch.int64)  # (N,)
    halves = []
    for salt in _SALTS:
        h = _absorb(torch.full_like(sample_index, salt), sample_index & _MASK32)  # (n,)
        h = _absorb(h, (sample_index >> 32) & _MASK32)
        h = _absorb(h, position & _MASK32)
        halves.append(_absorb(h[:, None], draw[None, :]))  # (n, N)
    return (halves[0] << 30) | (halves[1] >> 2)


def _cdf_and_targets(logits: torch.Tensor, lse: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor,
                     draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer CDF (n, V) of softmax(logits) and each draw's target (n, draws) in [0, total)."""
    cdf = (torch.exp(logits - lse[:, None]) * CDF_SCALE).to(torch.int64)  # (n, V) q_i = floor(p_i * 2**40)
    cdf = cdf.cumsum_(-1)  # exact: integers
    total = cdf[:, -1:]  # (n, 1); >= 2**40 / V > 0, the largest p being >= 1/V
    u = (random_bits(sample_index, position, draws) >> 9).double() * 2.0**-53  # (n, N) exact, uniform in [0, 1)
    return cdf, (u * total.double()).floor().to(torch.int64)  # targets (n, N) uniform in [0, total)


def sample_ids(logits: torch.Tensor, lse: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor,
               draws: int) -> torch.Tensor:
    """(n, V) float32 logits, (n,) their logsumexp and keys -> (n, draws) int64 ids drawn from softmax(logits)."""
    cdf, target = _cdf_and_targets(logits, lse, sample_index, position, draws)
    return torch.searchsorted(cdf, target, right=True)  # first i with cdf[i] > target


def draw_ranges(logits: torch.Tensor, lse: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor,
                draws: int, slack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded draws from these logits, and the ids each can have been when made from logits that differ from
    these by a CDF shift of at most `slack` (n,) (probability mass: what another dtype or kernel moves):
    (ids, lo, hi), each (n, draws) int64, ids as sample_ids draws them, lo <= ids <= hi."""
    cdf, target = _cdf_and_targets(logits, lse, sample_index, position, draws)
    shift = (slack.double()[:, None] * CDF_SCALE).ceil().to(torch.int64)  # (n, 1) in CDF units
    ids = torch.searchsorted(cdf, target, right=True)
    lo = torch.searchsorted(cdf, (target - shift).clamp_min(0), right=True)
    hi = torch.searchsorted(cdf, target + shift, right=True).clamp_max(cdf.shape[-1] - 1)
    return ids, lo, hi


def distinct_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N) drawn ids -> distinct ids (n, N) ascending and their counts (n, N), both left-aligned.

    Slots past a row's number of distinct ids hold id 0 and count 0; counts of a row sum to N.
    """
    ranked = ids.sort(-1).values  # (n, N)
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]  # (n, N) a new id starts here
    slot = first.cumsum(-1) - 1  # (n, N) which distinct id each draw belongs to
    distinct = torch.zeros_like(ranked).scatter_(1, slot, ranked)  # equal values land on a slot: no race
    counts = torch.zeros_like(ranked).scatter_add_(1, slot, torch.ones_like(ranked))
    return distinct, counts


def sample_rows(logits: torch.Tensor, lse: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor,
                draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled mode's per-row result: distinct ids (n, N) int64 and counts (n, N) int64, count 0 = padding."""
    return distinct_counts(sample_ids(logits, lse, sample_index, position, draws))


# -- checking draws against the teacher ------------------------------------------------------------------------

def explained(ids: torch.Tensor, counts: torch.Tensor, drawn: torch.Tensor, lo: torch.Tensor,
              hi: torch.Tensor) -> torch.Tensor:
    """Whether each row's stored draws, distinct ids (n, m) with counts (n, m) (0 = padding), can be the seeded
    draws (n, N) `drawn`, each of which may have been any id in [lo, hi] (draw_ranges): (n,) bool. Rows equal to
    `drawn` are found at once; a row that differs is matched draw by draw (stored draws to ranges, greedily by the
    ranges' right ends, which is exact for intervals)."""
    want_ids, want_counts = distinct_counts(drawn)  # (n, N)
    width = max(ids.shape[-1], want_ids.shape[-1])
    same = (_padded(ids * (counts > 0), width) == _padded(want_ids * (want_counts > 0), width)).all(-1)
    same &= (_padded(counts, width) == _padded(want_counts, width)).all(-1)
    result = same.clone()
    for r in torch.nonzero(~same).flatten().tolist():
        result[r] = _matches(ids[r], counts[r], lo[r], hi[r])
    return result


def _matches(ids: torch.Tensor, counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """One row: can the stored draws (ids repeated by counts) be given one to each range [lo_j, hi_j]?"""
    stored = sorted(torch.repeat_interleave(ids.long(), counts.long().clamp_min(0)).tolist())
    if len(stored) != len(lo):
        return False
    for a, b in sorted(zip(lo.tolist(), hi.tolist()), key=lambda r: r[1]):  # by right end: the greedy is exact
        i = bisect.bisect_left(stored, a)
        if i == len(stored) or stored[i] > b:
            return False
        del stored[i]
    return True


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, m) -> (n, width) int64, zeros on the right."""
    return torch.nn.functional.pad(x.long(), (0, width - x.shape[-1]))


# Buckets of the teacher's rank of a drawn id (0 = its most likely id): few enough to be well filled, fine enough
# at the head and into the tail to see any distortion that matters for a loss.
RANK_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 1024, 4096)
MIN_EXPECTED = 5.0  # buckets expecting fewer draws are merged into the one before: the chi-square needs it


@dataclass
class FitReport:
    """Pearson chi-square of drawn ids, bucketed by the teacher's rank of each id, against the teacher's probs.

    Rows draw from different distributions, so each bucket's count is a sum of binomials whose variance is at
    most its mean: the statistic is stochastically below chi-square(dof) and p_value is conservative, i.e.
    `p_value < alpha` happens with probability at most alpha when the draws are right.
    """

    draws: int
    statistic: float
    dof: int
    p_value: float
    observed: list[float]
    expected: list[float]


class FitAccumulator:
    """Adds up observed and expected draws per rank bucket over rows and samples; report() tests them."""

    def __init__(self):
        self.observed = torch.zeros(len(RANK_EDGES), dtype=torch.float64)
        self.expected = torch.zeros(len(RANK_EDGES), dtype=torch.float64)

    def add(self, probs: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """probs (L, V) the teacher's probabilities; ids, counts (L, m) one sample's draws (count 0 = padding)."""
        probs, ids, counts = probs.double().cpu(), ids.long().cpu(), counts.double().cpu()
        vocab = probs.shape[-1]
        edges = torch.tensor(RANK_EDGES, dtype=torch.int64)
        bucket_of_rank = torch.bucketize(torch.arange(vocab), edges, right=True) - 1  # (V,)
        order = probs.argsort(-1, descending=True)  # (L, V) ids by rank
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(vocab).expand_as(order))  # (L, V)
        draws = counts.sum(-1, keepdim=True)  # (L, 1)
        mass = torch.zeros(len(probs), len(RANK_EDGES), dtype=torch.float64)
        mass.index_add_(1, bucket_of_rank, probs.gather(1, order))  # (L, B) teacher's mass per bucket
        self.expected += (mass * draws).sum(0)
        drawn_bucket = bucket_of_rank[rank.gather(1, ids)]  # (L, m)
        self.observed += torch.bincount(drawn_bucket.flatten(), counts.flatten(), minlength=len(RANK_EDGES))

    def report(self) -> FitReport:
        observed, expected = self.observed.tolist(), self.expected.tolist()
        # Merge from the tail: a bucket expecting too few draws goes into the one before it.
        obs, exp = [observed[0]], [expected[0]]
        for o, e in zip(observed[1:], expected[1:]):
            if e < MIN_EXPECTED or exp[-1] < MIN_EXPECTED:
                obs[-1] += o
                exp[-1] += e
            else:
                obs.append(o)
                exp.append(e)
        if len(exp) > 1 and exp[-1] < MIN_EXPECTED:
            obs[-2] += obs.pop()
            exp[-2] += exp.pop()
        statistic = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
        dof = max(1, len(exp) - 1)
        p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                                torch.tensor(statistic / 2, dtype=torch.float64)))
        return FitReport(draws=int(sum(observed)), statistic=statistic, dof=dof, p_value=p_value,
                         observed=obs, expected=exp)
