"""Top-k and logsumexp of logit rows: what a cache row holds in top-k mode.

Contract of topk_logprobs: (..., V) logits -> ids (..., k) int64, best first, equal logits ordered by lowest id;
log-probs (..., k) float32 = logit - logsumexp; logsumexp (...) float32. Two implementations give the same ids in
the same order:

  fused (CUDA, when Triton imports): Triton kernels that read each logit once from memory.
    1. _scan_rows, one program per row, in tiles: the online logsumexp (running max and rescaled sum, per group
       lane, in float32) and the maximum of every group of GROUP consecutive ids, stored (n, V / GROUP).
    2. _select_by_threshold, one program per row: tau, the KP-th largest of the maxima of 4 * KP distinct
       groups, is a lower bound of the k-th largest logit; only groups whose maximum reaches tau are read again,
       and only their logits >= tau (about KP + 10 on real and random rows) are ranked, by one int64 key per
       logit (the float's order in the high half, 2**32-1 - id in the low half: one comparison orders by value
       desc, then id asc) with Triton's bitonic tl.topk. KP = k rounded up to a power of two.
    3. _select_spilled_rows: the rows with more than 2 * KP such groups or logits (ties around rank k) by
       _select_row's three rankings: the KP best groups by (max desc, group id asc), the KP best of their
       sub-groups of SUB ids, the KP best of those sub-groups' ids, each by keys. Exact because ids are
       contiguous in a group, so ordering groups by (max desc, group id asc) orders them as their best elements'
       keys: a group holding one of the k best elements e has a key >= e's key, and every group ranked above it
       holds an element ranked above e, of which there are fewer than k; so the k best elements lie in the k
       best groups, and, one level down, in the k best sub-groups of those.
    Before first use per device, V and k, self_check compares them with torch.topk's exact path on tie-heavy
    rows; a failure steps down to the three rankings for every row, then to the torch path (warning each time).
    Measured on an H200 (docs/PERFORMANCE.md), ms per 32,768 rows at V = 32,000 / 151,936: 2.46 / 7.92
    (scan 1.11 / 4.78, selection 1.37 / 3.37; one read of the logits alone: 0.97 / 4.61; torch path 15.5 / 71.2).
  torch (everywhere else, and whenever the kernels cannot run): logsumexp (compiled on CUDA) and torch.topk
    over k + TIE_SLACK candidates, re-sorted by (value desc, id asc), with an exact key-based redo for rows
    where more ids tie at rank k than there are candidates.

Equal results: ids are compared exactly on both paths, so they are identical, including any ties, -0.0 == 0.0
and -inf logits. The logsumexp sums the same terms in another order, so it can differ in the last bits
(tests/test_gpu.py states the bound); log-probs inherit that difference. A row that holds NaN has a NaN
logsumexp on both paths, and its ids are unspecified.
"""

from __future__ import annotations

import functools
import warnings

import torch

try:  # the fused kernels need Triton (CUDA builds of torch ship it); without it the torch path runs everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

# Logit elements the torch path takes at once (rows * V) when not told: bounds its float32 upcast.
TORCH_CHUNK_ELEMENTS = 2**26
# Candidates beyond k that the torch path takes so that a tie at rank k is settled by id without a second pass.
TIE_SLACK = 16
# The fused kernels keep KP * GROUP keys of a row in registers: k up to this runs fused, larger k the torch way.
FUSED_MAX_K = 128
# The fused kernels' tile sizes and launch shapes (bench/bench_topk.py --sweep times other values by setting these).
MAX_GROUP_KEYS = 2048  # GROUP grows until a row has at most this many groups (the first ranking's size)
SCAN_BLOCK = 4096  # ids per tile of _scan_rows (a multiple of GROUP)
SCAN_WARPS = 8
SELECT_WARPS = 4  # measured on an H200 at V = 151,936: 4.30 ms per 32k rows, 8 warps 5.12
THRESHOLD = True  # select by a threshold (_select_by_threshold); the three rankings only for spilled rows
THRESHOLD_WARPS = 4
THRESHOLD_CHUNK = 16  # chosen groups read at a time by _select_by_threshold


def topk_logprobs(
    logits: torch.Tensor, k: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(…, V) logits -> top-k ids (…, k) int64, their log-probs (…, k) float32, logsumexp (…) float32.

    Float32 whatever the logits' dtype. On CUDA with Triton: the fused kernels, one read of each logit
    (chunk_rows is not needed there: their scratch is V / 16 bytes a row). Otherwise rows are taken chunk_rows at
    a time, so any float32 upcast is bounded by chunk_rows * V. The top-k is taken on the raw logits (the same
    order as on the log-probs, logsumexp being a per-row constant) and log p = logit - logsumexp.
    """
    while _fused_usable(logits, k):  # at most twice: the threshold selection, then the rankings
        try:
            check = (logits.device, logits.shape[-1], k, THRESHOLD)
            if check not in _checked:  # once per device, vocabulary, k and selection
                self_check(*check[:3])
                _checked.add(check)
            return fused_topk_logprobs(logits, k)
        except Exception as e:  # e.g. a compiler that does not take a kernel: the next way, same ids
            _fused_failed(e)
    return torch_topk_logprobs(logits, k, chunk_rows)


def torch_topk_logprobs(
    logits: torch.Tensor, k: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_logprobs by torch operations alone, chunk_rows rows at a time: the path off CUDA and the fallback."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # (N, V)
    chunk_rows = chunk_rows or max(1, TORCH_CHUNK_ELEMENTS // vocab)
    ids, logprobs, lses = [], [], []
    for chunk in flat.split(chunk_rows) if len(flat) else [flat]:
        chunk = chunk.float()  # (n, V); no copy when the head already gave float32
        lse = row_logsumexp(chunk)  # (n,)
        top, idx = topk_lowest_id(chunk, k)  # (n, k), best first
        ids.append(idx)
        logprobs.append(top - lse[:, None])
        lses.append(lse)
    lead = logits.shape[:-1]
    return torch.cat(ids).view(*lead, k), torch.cat(logprobs).view(*lead, k), torch.cat(lses).view(lead)


def topk_lowest_id(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) float32 -> the k largest values (n, k) and their ids (n, k) int64; equal values by lowest id.

    torch.topk over k + TIE_SLACK candidates, then a (value desc, id asc) sort of the candidates: exact unless
    more than TIE_SLACK + 1 ids tie at rank k, and those rows (rare: a degenerate teacher) are redone exactly.
    """
    vocab = x.shape[-1]
    values, ids = x.topk(min(k + TIE_SLACK, vocab), dim=-1)  # (n, c), best first, ties in any order
    by_id = ids.sort(-1)  # (n, c): ascending ids, then a stable sort on value keeps them ascending within ties
    values, order = values.gather(1, by_id.indices).sort(dim=-1, descending=True, stable=True)
    ids = by_id.values.gather(1, order)
    if values.shape[1] > k:
        overflow = values[:, -1] == values[:, k - 1]  # (n,) the tie at rank k may go past the candidates
        if bool(overflow.any()):  # one device sync per chunk; the fix-up itself is rare
            rows = overflow.nonzero().squeeze(1)
            exact_values, exact_ids = topk_by_key(x[rows], k)
            values[rows, :k], ids[rows, :k] = exact_values, exact_ids
    return values[:, :k], ids[:, :k]


def topk_by_key(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of (r, V) float32 by one int64 key per logit: value's order in the high half, -id in the low.

    The reference the fused kernels implement (the same key); costs 8 bytes per logit, so used on few rows."""
    bits = (x + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float's value
    ids = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    key = (ordered << 32) | (0xFFFFFFFF - ids)  # larger value first, then lower id
    top_ids = 0xFFFFFFFF - (key.topk(k, dim=-1).values & 0xFFFFFFFF)  # (r, k)
    return x.gather(1, top_ids), top_ids


# -- logsumexp, torch path ----------------------------------------------------------------------------------


def _logsumexp_float32(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.float(), dim=-1)


@functools.cache
def _compiled_logsumexp():
    return torch.compile(_logsumexp_float32, dynamic=True)  # made on first use: importing dynamo takes seconds


_compile_failed = False


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """(n, V) -> (n,) float32. On CUDA a compiled kernel reads the logits once in their own dtype and sums in
    float32; eager upcasts and makes several passes (6x slower on an H100, see docs/PERFORMANCE.md)."""
    global _compile_failed
    if x.device.type != "cuda" or _compile_failed:
        return _logsumexp_float32(x)
    try:
        return _compiled_logsumexp()(x)
    except Exception as e:  # e.g. no Triton for this GPU: same numbers, slower
        _compile_failed = True
        warnings.warn(f"compiled logsumexp unavailable ({type(e).__name__}: {e}); using eager", stacklevel=2)
        return _logsumexp_float32(x)


# -- fused path ---------------------------------------------------------------------------------------------

_fused_disabled = False


def _fused_usable(logits: torch.Tensor, k: int) -> bool:
    return (triton is not None and not _fused_disabled and logits.device.type == "cuda"
            and 1 <= k <= min(FUSED_MAX_K, logits.shape[-1]) and logits.numel() > 0)


_checked: set = set()  # (device, V, k, THRESHOLD) the fused kernels passed self_check on


def check_rows(vocab: int, device) -> torch.Tensor:
    """(16, V) float32 logits for self_check: random rows and rows full of ties (bf16-rounded narrow values, a wide
    tie at the top, tied ids straddling rank k, -inf for most ids, -0.0 next to 0.0, one value everywhere, no
    finite value)."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(16, vocab, generator=g) * 4
    x[1] = (x[1] * 0.1).bfloat16().float()
    x[2, vocab // 4: vocab // 4 + 100] = 30.0
    x[3, ::7] = x[3].max() + 1
    x[4, vocab // 3:] = -float("inf")
    x[5] = -0.0
    x[5, ::5] = 0.0
    x[6] = 1.5
    x[7] = -float("inf")
    x[8] = (torch.randn(vocab, generator=g) * 0.01).bfloat16().float()
    return x.to(device)


def self_check(device, vocab: int, k: int) -> None:
    """The fused kernels against torch.topk's exact path on check_rows, on `device`: raises when an id differs or
    a value is off by more than 1e-4 (the pipeline then uses the torch path). A guard against a compiler or GPU
    that runs the kernels differently from where they were tested; costs milliseconds, once."""
    x = check_rows(vocab, device)
    ids, logprobs, lse = fused_topk_logprobs(x, k)
    values, ref_ids = topk_lowest_id(x, k)
    ref_lse = torch.logsumexp(x, dim=-1)
    if not torch.equal(ids, ref_ids):
        rows = (ids != ref_ids).any(-1).nonzero().squeeze(1).tolist()
        raise RuntimeError(f"self-check: ids differ from torch.topk's in check rows {rows}")
    if not (torch.allclose(lse, ref_lse, rtol=0, atol=1e-4, equal_nan=True)
            and torch.allclose(logprobs, values - ref_lse[:, None], rtol=0, atol=1e-4, equal_nan=True)):
        raise RuntimeError("self-check: log-probs or logsumexp differ from torch's by more than 1e-4")


def _fused_failed(error: Exception) -> None:
    """Step down and warn: from the threshold selection to the three rankings, from those to the torch path (the
    same ids; the logsumexp to float32 rounding), for the rest of the process."""
    global THRESHOLD, _fused_disabled
    if THRESHOLD:
        THRESHOLD, instead = False, "selecting by the three rankings"
    else:
        _fused_disabled, instead = True, "using torch.topk"
    warnings.warn(f"fused top-k kernels failed ({type(error).__name__}: {error}); {instead}", stacklevel=3)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fused_plan(vocab: int, k: int) -> dict[str, int]:
    """The kernels' sizes for a vocabulary and k (all powers of two but n_groups).

    GROUP grows with V so that at most MAX_GROUP_KEYS group keys are ranked per row (64 at V = 32k: 500 groups;
    128 at 151,936: 1,187 groups); SUB = GROUP / 8 so the second ranking is over KP * 8 sub-groups and the last
    over KP * SUB ids."""
    kp = _next_pow2(k)
    group = 64
    while -(-vocab // group) > MAX_GROUP_KEYS:
        group *= 2
    n_groups = -(-vocab // group)
    return {"KP": kp, "GROUP": group, "SUB": group // 8, "n_groups": n_groups,
            "GROUPS_P2": max(_next_pow2(n_groups), kp), "BLOCK": max(SCAN_BLOCK, group)}


def fused_topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_logprobs by the two Triton kernels (module docstring). Any float dtype; rows are taken as they are
    when the last dim is contiguous. Runs on CPU tensors too under TRITON_INTERPRET=1 (the tests do that)."""
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)  # (N, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    plan = fused_plan(vocab, k)
    with torch.cuda.device(flat.device) if flat.device.type == "cuda" else _nothing():
        lse, group_max = fused_scan(flat, plan)
        ids, logprobs = fused_select(flat, group_max, lse, k, plan)
    return ids.view(*lead, k), logprobs.view(*lead, k), lse.view(lead)


def fused_scan(flat: torch.Tensor, plan: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 (_scan_rows): (N, V) logits, last dim contiguous -> logsumexp (N,) float32 and the maximum of each
    group of plan["GROUP"] ids (N, n_groups) float32. On the logits' device (current CUDA device)."""
    n, vocab = flat.shape
    lse = torch.empty(n, dtype=torch.float32, device=flat.device)
    group_max = torch.empty(n, plan["n_groups"], dtype=torch.float32, device=flat.device)  # (N, G)
    # The vocabulary is a compile-time constant (one teacher per process): static loop bounds and masks.
    _scan_rows[(n,)](flat, flat.stride(0), lse, group_max, VOCAB=vocab, N_GROUPS=plan["n_groups"],
                     GROUP=plan["GROUP"], BLOCK=plan["BLOCK"], num_warps=SCAN_WARPS)
    return lse, group_max


def fused_select(flat: torch.Tensor, group_max: torch.Tensor, lse: torch.Tensor, k: int,
                 plan: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: fused_scan's results -> ids (N, k) int64 and log-probs (N, k) float32; by a threshold (then the
    three rankings for the spilled rows) when THRESHOLD, else by the three rankings for every row."""
    n, vocab = flat.shape
    ids = torch.empty(n, k, dtype=torch.int64, device=flat.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=flat.device)
    if THRESHOLD:
        _threshold_select(flat, group_max, lse, ids, logprobs, k, plan)
    else:
        _select_rows[(n,)](flat, flat.stride(0), group_max, lse, ids, logprobs, k, VOCAB=vocab,
                           N_GROUPS=plan["n_groups"], GROUP=plan["GROUP"], SUB=plan["SUB"],
                           GROUPS_P2=plan["GROUPS_P2"], KP=plan["KP"], num_warps=SELECT_WARPS)
    return ids, logprobs


def _threshold_select(flat, group_max, lse, ids, logprobs, k, plan) -> None:
    """The selection by a threshold (_select_by_threshold), then the three rankings (_select_rows) for the rows
    whose candidates did not fit (rare: many ties near rank k); the second launch skips every other row."""
    n, vocab = flat.shape
    cap = 2 * plan["KP"]
    group_slots = torch.empty(n, cap, dtype=torch.int32, device=flat.device)
    value_slots = torch.empty(n, cap, dtype=torch.float32, device=flat.device)
    id_slots = torch.empty(n, cap, dtype=torch.int32, device=flat.device)
    spilled = torch.empty(n, dtype=torch.int32, device=flat.device)
    args = (flat, flat.stride(0), group_max, lse, ids, logprobs, k, group_slots, value_slots, id_slots, spilled)
    sizes = dict(VOCAB=vocab, N_GROUPS=plan["n_groups"], GROUP=plan["GROUP"], GROUPS_P2=plan["GROUPS_P2"],
                 KP=plan["KP"], R=min(4, plan["GROUPS_P2"] // plan["KP"]), CAP=cap, CHUNK=THRESHOLD_CHUNK)
    _select_by_threshold[(n,)](*args, **sizes, num_warps=THRESHOLD_WARPS)
    _select_spilled_rows[(n,)](flat, flat.stride(0), group_max, lse, ids, logprobs, k, spilled, VOCAB=vocab,
                               N_GROUPS=plan["n_groups"], GROUP=plan["GROUP"], SUB=plan["SUB"],
                               GROUPS_P2=plan["GROUPS_P2"], KP=plan["KP"], num_warps=SELECT_WARPS)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if triton is not None:

    @triton.jit
    def _key(x, ids):
        """float32 values and int64 ids (same shape) -> int64 keys: larger value first, then lower id."""
        bits = x.to(tl.int32, bitcast=True)
        # -0.0 and 0.0 are equal: one key. On the bits, since a compiler allowed to ignore the sign of zero may
        # fold a float select such as where(x == 0, 0.0, x) into x.
        bits = tl.where(bits == -2147483648, 0, bits)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the value (NaN aside)
        low = tl.full(ids.shape, 4294967295, tl.int64) - ids
        return (ordered.to(tl.int64) << 32) | low

    @triton.jit
    def _key_id(key):
        low = tl.full(key.shape, 4294967295, tl.int64)
        return low - (key & low)

    @triton.jit
    def _key_value(key):
        ordered = (key >> 32).to(tl.int32)
        bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)  # the map is its own inverse
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _scan_tile(base, group_max_row, start, m, s, VOCAB: tl.constexpr, N_GROUPS: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        """One tile of ids [start, start + BLOCK) as (LANES, GROUP): store its group maxima, fold it into the
        running (m, s) of each lane."""
        LANES: tl.constexpr = BLOCK // GROUP
        lane = tl.arange(0, LANES)
        ids = start + lane[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (LANES, GROUP)
        if MASKED:  # only the last, partial tile: full tiles load without a mask (fewer registers, wider loads)
            x = tl.load(base + ids, mask=ids < VOCAB, other=float("-inf"), eviction_policy="evict_first")
        else:
            x = tl.load(base + ids, eviction_policy="evict_first")
        x = x.to(tl.float32)
        tile_max = tl.max(x, axis=1)  # (LANES,)
        group = start // GROUP + lane
        if MASKED:
            tl.store(group_max_row + group, tile_max, mask=group < N_GROUPS)
        else:
            tl.store(group_max_row + group, tile_max)
        new_m = tl.maximum(m, tile_max)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: exp(-inf - 0) = 0, not NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        return new_m, s

    @triton.jit
    def _scan_row(logits, row_stride, lse_out, group_max, row,
                  VOCAB: tl.constexpr, N_GROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
        """Row `row` of logits (V,) -> lse_out[row] and group_max[row, g] = max of ids [g*GROUP, (g+1)*GROUP).

        The online logsumexp runs per group lane (LANES = BLOCK / GROUP of them): lane j keeps the running max m_j
        and sum s_j = sum exp(x - m_j) of the groups j, j + LANES, ...; only within-group reductions per tile.
        The lanes are combined at the end: lse = M + log(sum_j s_j exp(m_j - M)), M = max_j m_j."""
        LANES: tl.constexpr = BLOCK // GROUP
        FULL: tl.constexpr = VOCAB // BLOCK * BLOCK  # ids in full tiles
        base = logits + row * row_stride
        group_max_row = group_max + row * N_GROUPS
        m = tl.full([LANES], float("-inf"), tl.float32)
        s = tl.zeros([LANES], tl.float32)
        for start in range(0, FULL, BLOCK):
            m, s = _scan_tile(base, group_max_row, start, m, s, VOCAB, N_GROUPS, GROUP, BLOCK, False)
        if FULL < VOCAB:
            m, s = _scan_tile(base, group_max_row, FULL, m, s, VOCAB, N_GROUPS, GROUP, BLOCK, True)
        top = tl.max(m, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        lse = shift + tl.log(tl.sum(s * tl.exp(m - shift), axis=0))
        tl.store(lse_out + row, tl.where(top == float("inf"), float("inf"), lse))  # +inf - +inf would be NaN

    @triton.jit
    def _select_row(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, row, VOCAB: tl.constexpr,
                    N_GROUPS: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr, GROUPS_P2: tl.constexpr,
                    KP: tl.constexpr):
        """Row `row` -> its KP best ids (the first k stored, best first) and their log-probs, in three rankings:
        groups (GROUPS_P2 keys) -> sub-groups of the KP best groups (KP * GROUP / SUB keys) -> ids of the KP
        best sub-groups (KP * SUB keys). Padding keys are int64's minimum, below every real key."""
        SUBS: tl.constexpr = GROUP // SUB
        base = logits + row * row_stride
        lowest = tl.full([], -9223372036854775808, tl.int64)

        group = tl.arange(0, GROUPS_P2).to(tl.int64)
        values = tl.load(group_max + row * N_GROUPS + group, mask=group < N_GROUPS, other=float("-inf"))
        best = tl.topk(tl.where(group < N_GROUPS, _key(values, group), lowest), KP)  # (KP,) best groups first
        group = _key_id(best)  # padding groups get 2**32 - 1: all their ids fail `< VOCAB`

        sub = group[:, None] * SUBS + tl.arange(0, SUBS)[None, :]  # (KP, SUBS) sub-group ids
        ids = sub[:, :, None] * SUB + tl.arange(0, SUB)[None, None, :]  # (KP, SUBS, SUB)
        x = tl.load(base + ids, mask=ids < VOCAB, other=float("-inf")).to(tl.float32)
        sub_key = tl.where(sub * SUB < VOCAB, _key(tl.max(x, axis=2), sub), lowest)  # (KP, SUBS)
        best = tl.topk(tl.reshape(sub_key, [KP * SUBS]), KP)  # (KP,) best sub-groups first
        sub = _key_id(best)

        ids = sub[:, None] * SUB + tl.arange(0, SUB)[None, :]  # (KP, SUB)
        x = tl.load(base + ids, mask=ids < VOCAB, other=float("-inf")).to(tl.float32)
        key = tl.where(ids < VOCAB, _key(x, ids), lowest)
        best = tl.topk(tl.reshape(key, [KP * SUB]), KP)  # (KP,) best ids first

        out = tl.arange(0, KP)
        lse = tl.load(lse_in + row)
        tl.store(ids_out + row * k + out, _key_id(best), mask=out < k)
        tl.store(logprobs_out + row * k + out, _key_value(best) - lse, mask=out < k)

    @triton.jit
    def _scan_rows(logits, row_stride, lse_out, group_max,
                   VOCAB: tl.constexpr, N_GROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
        _scan_row(logits, row_stride, lse_out, group_max, tl.program_id(0).to(tl.int64), VOCAB, N_GROUPS, GROUP,
                  BLOCK)

    @triton.jit
    def _select_rows(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, VOCAB: tl.constexpr,
                     N_GROUPS: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr, GROUPS_P2: tl.constexpr,
                     KP: tl.constexpr):
        _select_row(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, tl.program_id(0).to(tl.int64),
                    VOCAB, N_GROUPS, GROUP, SUB, GROUPS_P2, KP)

    @triton.jit
    def _select_spilled_rows(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, spilled,
                             VOCAB: tl.constexpr, N_GROUPS: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr,
                             GROUPS_P2: tl.constexpr, KP: tl.constexpr):
        """_select_rows for the rows _select_by_threshold flagged; the other programs end at once."""
        row = tl.program_id(0).to(tl.int64)
        if tl.load(spilled + row) != 0:
            _select_row(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, row, VOCAB, N_GROUPS,
                        GROUP, SUB, GROUPS_P2, KP)

    @triton.jit
    def _threshold_chunk(base, group_slots, value_slots, id_slots, first, n_groups, n_keys, tau,
                         VOCAB: tl.constexpr, GROUP: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr):
        """The logits >= tau of chosen groups first..first+CHUNK-1 appended to the row's value and id slots;
        returns the new count."""
        slot = first + tl.arange(0, CHUNK)
        chosen = tl.load(group_slots + slot, mask=slot < n_groups, other=-1).to(tl.int64)
        ids = chosen[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (CHUNK, GROUP)
        valid = (chosen[:, None] >= 0) & (ids < VOCAB)
        x = tl.load(base + ids, mask=valid, other=float("-inf")).to(tl.float32)
        hit = tl.reshape(valid & (x >= tau), [CHUNK * GROUP])
        slot = n_keys + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(value_slots + slot, tl.reshape(x, [CHUNK * GROUP]), mask=hit & (slot < CAP))
        tl.store(id_slots + slot, tl.reshape(ids, [CHUNK * GROUP]).to(tl.int32), mask=hit & (slot < CAP))
        return n_keys + tl.sum(hit.to(tl.int32), axis=0)

    @triton.jit
    def _threshold_row(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, group_slots, value_slots,
                       id_slots, spilled, row, VOCAB: tl.constexpr, N_GROUPS: tl.constexpr, GROUP: tl.constexpr,
                       GROUPS_P2: tl.constexpr, KP: tl.constexpr, R: tl.constexpr, CAP: tl.constexpr,
                       CHUNK: tl.constexpr):
        """Row `row` -> its KP best ids and log-probs, ranking only the logits at or above a threshold tau.

        tau is the KP-th largest of the maxima of R * KP distinct groups (the R best of each of KP columns of
        groups): those are R * KP distinct logits, so the k-th largest logit is >= tau and every top-k id is among
        the logits >= tau, which lie in groups whose maximum is >= tau. Those groups' ids, then those logits'
        values and ids, are compacted (a prefix sum gives each its slot; stored to this row's scratch and read back
        after a barrier) into CAP slots, and their keys ranked; the chosen groups are read CHUNK at a time. On
        real and random rows about KP groups and KP + 10 logits pass; a row with more (ties around rank k) is
        flagged in `spilled` for _select_spilled_rows."""
        COLS: tl.constexpr = GROUPS_P2 // KP
        base = logits + row * row_stride
        maxima = group_max + row * N_GROUPS
        lowest = tl.full([], -9223372036854775808, tl.int64)

        group = tl.arange(0, KP)[:, None] + tl.arange(0, COLS)[None, :] * KP  # (KP, COLS): column c, j-th group
        best = tl.topk(tl.load(maxima + group, mask=group < N_GROUPS, other=float("-inf")), R)  # (KP, R)
        tau = tl.min(tl.topk(tl.reshape(best, [KP * R]), KP), axis=0)

        group = tl.arange(0, GROUPS_P2)
        hit = (tl.load(maxima + group, mask=group < N_GROUPS, other=float("-inf")) >= tau) & (group < N_GROUPS)
        slot = tl.cumsum(hit.to(tl.int32), axis=0) - 1
        n_groups = tl.sum(hit.to(tl.int32), axis=0)
        tl.store(group_slots + row * CAP + slot, group, mask=hit & (slot < CAP))
        tl.debug_barrier()  # the slots, stored by all threads, read by all threads

        n_keys = tl.sum(tl.zeros([1], tl.int32), axis=0)  # logits >= tau found so far
        for first in tl.static_range(0, CAP, CHUNK):  # CHUNK chosen groups at a time, as far as there are any
            if first < n_groups:
                n_keys = _threshold_chunk(base, group_slots + row * CAP, value_slots + row * CAP,
                                          id_slots + row * CAP, first, n_groups, n_keys, tau, VOCAB, GROUP, CAP,
                                          CHUNK)
        tl.debug_barrier()
        slot = tl.arange(0, CAP)
        found = slot < n_keys
        x = tl.load(value_slots + row * CAP + slot, mask=found, other=float("-inf"))
        ids = tl.load(id_slots + row * CAP + slot, mask=found, other=0).to(tl.int64)
        best = tl.topk(tl.where(found, _key(x, ids), lowest), KP)  # (KP,)

        tl.store(spilled + row, ((n_groups > CAP) | (n_keys > CAP)).to(tl.int32))
        out = tl.arange(0, KP)
        lse = tl.load(lse_in + row)
        tl.store(ids_out + row * k + out, _key_id(best), mask=out < k)  # a spilled row is overwritten later
        tl.store(logprobs_out + row * k + out, _key_value(best) - lse, mask=out < k)

    @triton.jit
    def _select_by_threshold(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, group_slots,
                             value_slots, id_slots, spilled, VOCAB: tl.constexpr, N_GROUPS: tl.constexpr,
                             GROUP: tl.constexpr, GROUPS_P2: tl.constexpr, KP: tl.constexpr, R: tl.constexpr,
                             CAP: tl.constexpr, CHUNK: tl.constexpr):
        _threshold_row(logits, row_stride, group_max, lse_in, ids_out, logprobs_out, k, group_slots, value_slots,
                       id_slots, spilled, tl.program_id(0).to(tl.int64), VOCAB, N_GROUPS, GROUP, GROUPS_P2, KP, R,
                       CAP, CHUNK)
