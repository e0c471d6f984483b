"""The decoder's slot KV cache: exact round trips of prefix, prompt and per-token writes, slot moves and clears
that touch only what they promise (a departing row leaves zeros), and a decode step through ``prefix_attention`` that equals plain SDPA over each row's
[prefix, tokens] keys and values."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptserve.server.generation.kv_cache import SlotKVCache
from ptserve.server.prefix_attention import CacheContext, prefix_attention

LAYERS, SLOTS, KV_HEADS, HEADS, HEAD_DIM, CAP, MAX_TOKENS = 2, 4, 2, 4, 8, 6, 10


def cache() -> SlotKVCache:
    return SlotKVCache(LAYERS, SLOTS, KV_HEADS, HEAD_DIM, CAP, MAX_TOKENS, torch.device("cpu"), torch.float32)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def snapshot(c: SlotKVCache) -> list[torch.Tensor]:
    return [t.clone() for t in (*c.k, *c.v)]


def fill_random(c: SlotKVCache, seed=0) -> None:
    for i, t in enumerate((*c.k, *c.v)):
        t.copy_(rand(*t.shape, seed=seed + i))


def test_starts_zeroed_and_reports_its_size():
    c = cache()
    assert all(not t.any() for t in (*c.k, *c.v))
    assert c.nbytes == 2 * LAYERS * SLOTS * KV_HEADS * (CAP + MAX_TOKENS) * HEAD_DIM * 4


def test_write_prefix_round_trip_right_aligned():
    c = cache()
    p = 4
    kv = rand(LAYERS, 2, KV_HEADS, p, HEAD_DIM)
    c.write_prefix(2, kv)
    for layer in range(LAYERS):
        k, v = c.read(layer, slice(2, 3), slice(CAP - p, CAP))
        assert torch.equal(k[0], kv[layer, 0]) and torch.equal(v[0], kv[layer, 1])
        # nothing else moved: the left of the prefix area, the token columns, the other slots
        assert not c.k[layer][2, :, : CAP - p].any() and not c.k[layer][2, :, CAP:].any()
        assert not c.k[layer][[0, 1, 3]].any() and not c.v[layer][[0, 1, 3]].any()


def test_write_prompt_round_trip():
    c = cache()
    t = 5
    for layer in range(LAYERS):
        key = rand(2, KV_HEADS, t, HEAD_DIM, seed=layer)
        value = rand(2, KV_HEADS, t, HEAD_DIM, seed=10 + layer)
        c.write_prompt(layer, slice(1, 3), key, value)
        k, v = c.read(layer, slice(1, 3), slice(CAP, CAP + t))
        assert torch.equal(k, key) and torch.equal(v, value)
        assert not c.k[layer][1:3, :, CAP + t:].any() and not c.k[layer][1:3, :, :CAP].any()
        assert not c.k[layer][[0, 3]].any()


def test_write_at_per_row_positions_round_trip():
    c = cache()
    fill_random(c)
    before = snapshot(c)
    pos = torch.tensor([[3], [0], [7]])  # one new token per row, each at its own column
    key, value = rand(3, KV_HEADS, 1, HEAD_DIM, seed=5), rand(3, KV_HEADS, 1, HEAD_DIM, seed=6)
    c.write(1, slice(0, 3), pos, key, value)
    for row, col in enumerate(pos[:, 0].tolist()):
        assert torch.equal(c.k[1][row, :, CAP + col], key[row, :, 0])
        assert torch.equal(c.v[1][row, :, CAP + col], value[row, :, 0])
    # exactly those three columns of layer 1 changed
    changed = torch.zeros(SLOTS, CAP + MAX_TOKENS, dtype=torch.bool)
    changed[[0, 1, 2], CAP + pos[:, 0]] = True
    for now, then in zip((c.k[1], c.v[1]), (before[1], before[LAYERS + 1])):
        assert torch.equal(now.permute(0, 2, 1, 3)[~changed], then.permute(0, 2, 1, 3)[~changed])
    assert torch.equal(c.k[0], before[0]) and torch.equal(c.v[0], before[LAYERS])


def test_write_several_tokens_per_row():
    c = cache()
    pos = torch.tensor([[2, 3], [5, 6]])  # [B, T_q]
    key, value = rand(2, KV_HEADS, 2, HEAD_DIM, seed=1), rand(2, KV_HEADS, 2, HEAD_DIM, seed=2)
    c.write(0, slice(2, 4), pos, key, value)
    assert torch.equal(c.k[0][2, :, CAP + 2: CAP + 4], key[0])
    assert torch.equal(c.k[0][3, :, CAP + 5: CAP + 7], key[1])
    assert torch.equal(c.v[0][2, :, CAP + 2: CAP + 4], value[0])
    assert torch.equal(c.v[0][3, :, CAP + 5: CAP + 7], value[1])


def test_read_is_a_view():
    c = cache()
    k, _ = c.read(0, slice(0, 2), slice(1, CAP + 3))
    k.fill_(1.0)
    assert (c.k[0][:2, :, 1: CAP + 3] == 1).all() and not c.k[0][:2, :, CAP + 3:].any()


def test_move_copies_the_occupants_columns_and_zeroes_the_source():
    c = cache()
    fill_random(c)
    c.clear(1, CAP, MAX_TOKENS)  # the destination was cleared by its departing occupant
    before = snapshot(c)
    p, tokens = 3, 4
    c.move(src=3, dst=1, prefix_len=p, tokens=tokens)
    cols = slice(CAP - p, CAP + tokens)
    for layer in range(LAYERS):
        for now, then in ((c.k[layer], before[layer]), (c.v[layer], before[LAYERS + layer])):
            assert torch.equal(now[1, :, cols], then[3, :, cols])  # its prefix + the tokens it wrote
            assert not now[1, :, : CAP - p].any() and not now[1, :, CAP + tokens:].any()  # nothing else
            assert not now[3, :, cols].any()  # the source gives its columns up
            assert torch.equal(now[3, :, : CAP - p], then[3, :, : CAP - p])  # and touches nothing else
            assert torch.equal(now[[0, 2]], then[[0, 2]])  # bystanders untouched


def test_clear_zeroes_exactly_the_occupants_columns():
    c = cache()
    fill_random(c, seed=3)
    before = snapshot(c)
    c.clear(2, prefix_len=2, tokens=5)
    for now, then in zip((*c.k, *c.v), before):
        assert not now[2, :, CAP - 2: CAP + 5].any()
        assert torch.equal(now[2, :, : CAP - 2], then[2, :, : CAP - 2])
        assert torch.equal(now[2, :, CAP + 5:], then[2, :, CAP + 5:])
        assert torch.equal(now[[0, 1, 3]], then[[0, 1, 3]])
    c.clear_all()
    assert all(not t.any() for t in (*c.k, *c.v))


def test_a_stale_non_finite_value_in_a_masked_column_poisons_attention():
    """Why departing rows are zeroed: SDPA reads masked columns too, and NaN (or an infinite key score against
    the mask's -inf) in one of them turns the row's output into NaN."""
    query = rand(1, HEADS, 1, HEAD_DIM, seed=1)
    keys, values = rand(1, KV_HEADS, 5, HEAD_DIM, seed=2), rand(1, KV_HEADS, 5, HEAD_DIM, seed=3)
    mask = torch.tensor([True, True, True, False, False])[None, None, None, :]  # the last two are masked
    clean = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    assert clean.isfinite().all()
    stale_v, stale_k = values.clone(), keys.clone()
    stale_v[:, :, 4] = float("nan")
    stale_k[:, :, 3] = float("inf")
    for k, v in ((keys, stale_v), (stale_k, values)):
        assert F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True).isnan().any()


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.eval()


def test_decode_step_equals_sdpa_over_prefix_and_tokens():
    """Rows with different prefix lengths and different numbers of cached tokens decode one token together;
    each row's output equals SDPA over exactly its own [prefix, cached tokens, new token] (GQA: 4 query heads,
    2 kv heads). Stale values in the unused columns of each slot must not leak in."""
    c = cache()
    fill_random(c, seed=100)  # stale garbage everywhere a row does not own
    layer, prefix_lens, cached = 1, [1, 4, 6], [3, 0, 9]
    b = len(prefix_lens)
    prefixes = [rand(LAYERS, 2, KV_HEADS, p, HEAD_DIM, seed=20 + i) for i, p in enumerate(prefix_lens)]
    tokens_k = [rand(1, KV_HEADS, n, HEAD_DIM, seed=30 + i) for i, n in enumerate(cached)]
    tokens_v = [rand(1, KV_HEADS, n, HEAD_DIM, seed=40 + i) for i, n in enumerate(cached)]
    for row in range(b):
        c.write_prefix(row, prefixes[row])
        if cached[row]:
            c.write_prompt(layer, slice(row, row + 1), tokens_k[row], tokens_v[row])
    query = rand(b, HEADS, 1, HEAD_DIM, seed=50)
    new_k, new_v = rand(b, KV_HEADS, 1, HEAD_DIM, seed=51), rand(b, KV_HEADS, 1, HEAD_DIM, seed=52)

    # the context as decode_forward builds it
    p_max, t_end = max(prefix_lens), max(cached) + 1
    cached_t, p_lens = torch.tensor(cached), torch.tensor(prefix_lens)
    prefix_ok = torch.arange(p_max)[None, :] >= (p_max - p_lens)[:, None]
    token_ok = torch.arange(t_end)[None, :] <= cached_t[:, None]
    mask = torch.cat([prefix_ok, token_ok], dim=1)[:, None, None, :]
    ctx = CacheContext(cache=c, slots=slice(0, b), write_pos=cached_t[:, None],
                       window=slice(CAP - p_max, CAP + t_end), mask=mask)
    out, _ = prefix_attention(_Layer(layer), query, new_k, new_v, attention_mask=None, scaling=None,
                              ptserve_cache=ctx)
    assert out.shape == (b, 1, HEADS, HEAD_DIM)

    for row in range(b):
        keys = torch.cat([prefixes[row][layer, 0][None], tokens_k[row], new_k[row: row + 1]], dim=2)
        values = torch.cat([prefixes[row][layer, 1][None], tokens_v[row], new_v[row: row + 1]], dim=2)
        expected = F.scaled_dot_product_attention(query[row: row + 1], keys, values, enable_gqa=True)
        torch.testing.assert_close(out[row: row + 1].transpose(1, 2), expected, rtol=0, atol=1e-6)
        # and the new token's K/V now sit in the row's slot, after its cached tokens
        assert torch.equal(c.k[layer][row, :, CAP + cached[row]], new_k[row, :, 0])
        assert torch.equal(c.v[layer][row, :, CAP + cached[row]], new_v[row, :, 0])
