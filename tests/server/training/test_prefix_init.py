"""A prefix started from the backbone's own keys and values (``TrainConfig.prefix_init = "tokens"``): each virtual
token is, in every layer, exactly the K/V of one real token of the training texts, read through the serving
forward; the draw is seeded; and at step 0 the backbone's features move less than under PEFT's random start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptserve.server.engine import encoder_forward
from ptserve.server.pooling import mean_states
from ptserve.server.resident import prefix_kv
from ptserve.server.training.classify import PrefixClassifier, TrainConfig, tokenize, train_classifier
from ptserve.server.training.data import Example
from ptserve.server.training.prefix_init import token_kv

TEXTS = ["the flight was late and nobody told us why", "great service, thank you so much",
         "my bag never arrived", "ok"]


def _hf_kv(bb, ids: list[tuple[int, ...]]) -> torch.Tensor:
    """[L, 2, B, T, H*D] every layer's key and value Linear outputs of a plain HF forward (hooks; no ptserve)."""
    out, hooks = {}, []
    for i, layer in enumerate(bb.model.encoder.layer):
        for j, name in enumerate(("key", "value")):
            mod = getattr(layer.attention.self, name)
            hooks.append(mod.register_forward_hook(lambda m, a, o, i=i, j=j: out.__setitem__((i, j), o.detach())))
    t = max(map(len, ids))
    input_ids = torch.tensor([list(r) + [bb.pad_token_id] * (t - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in ids])
    try:
        with torch.no_grad():
            bb.model(input_ids=input_ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.stack([out[(i, 0)], out[(i, 1)]]) for i in range(len(bb.model.encoder.layer))])


def test_every_virtual_token_is_one_real_tokens_kv_in_every_layer(minilm):
    fp = minilm.fingerprint
    ids = tokenize(minilm, TEXTS, 12, None)
    flat = token_kv(minilm, ids, 12, seed=3)
    assert flat.shape == (12, fp.prefix_width) and flat.dtype == torch.float32
    kv = prefix_kv(flat, fp)  # [L, 2, H, P, D]
    virtual = kv.permute(3, 0, 1, 2, 4).reshape(12, fp.num_layers, 2, -1)  # [P, L, 2, H*D]
    hf = _hf_kv(minilm, ids)  # [L, 2, B, T, H*D]
    real = {(b, t): hf[:, :, b, t] for b, r in enumerate(ids) for t in range(len(r))}  # pad columns excluded
    matched = []
    for p in range(12):
        hits = [place for place, v in real.items() if torch.allclose(virtual[p], v, atol=1e-4)]
        assert len(hits) == 1, f"virtual token {p} matches {len(hits)} real tokens"
        matched.append(hits[0])
    assert len(set(matched)) == 12  # drawn without replacement
    assert torch.equal(token_kv(minilm, ids, 12, seed=3), flat)
    assert not torch.equal(token_kv(minilm, ids, 12, seed=4), flat)


def test_more_virtual_tokens_than_real_ones_draws_again(minilm):
    ids = tokenize(minilm, ["ok"], 8, None)  # [CLS] ok [SEP]: 3 real tokens
    flat = token_kv(minilm, ids, 8, seed=0)
    assert flat.shape[0] == 8 and len({tuple(r.tolist()) for r in flat}) == 3


def test_at_step_zero_the_features_move_less_than_from_a_random_start(minilm):
    ids = tokenize(minilm, TEXTS, 16, None)
    fp, b = minilm.fingerprint, len(ids)

    def features(flat):
        kv = prefix_kv(flat, fp) if flat is not None else torch.zeros(fp.num_layers, 2, fp.num_kv_heads, 0,
                                                                       fp.head_dim)
        kv = kv.unsqueeze(2).expand(-1, -1, b, -1, -1, -1)
        with torch.no_grad():
            hidden, _ = encoder_forward(minilm, ids, kv, [kv.shape[4]] * b)
        return mean_states(hidden, [len(t) for t in ids])

    plain = features(None)
    torch.manual_seed(0)
    random_start = PrefixClassifier(minilm, 2, TrainConfig(virtual_tokens=16)).prefix()
    from_tokens = token_kv(minilm, ids, 16, seed=0)
    cos_random = F.cosine_similarity(features(random_start.detach()), plain).mean()
    cos_tokens = F.cosine_similarity(features(from_tokens), plain).mean()
    assert cos_tokens > cos_random + 0.05, (float(cos_tokens), float(cos_random))


def test_the_trainer_starts_from_tokens_and_refuses_what_cannot(minilm):
    train = [Example(t, "neg" if i % 2 else "pos") for i, t in enumerate(TEXTS * 4)]
    cfg = TrainConfig(virtual_tokens=4, epochs=1, prefix_init="tokens", seed=1, lr=1e-9, head_lr=1e-9,
                      warmup_ratio=0.0)
    result = train_classifier(minilm, train, None, cfg)
    start = token_kv(minilm, tokenize(minilm, [e.text for e in train], 4, None), 4, seed=1)
    assert torch.allclose(result.adapter.prompt_embeddings, start, atol=1e-5)  # lr ~0: still where it started
    with pytest.raises(ValueError, match="reparameterised"):
        train_classifier(minilm, train, None, TrainConfig(virtual_tokens=4, epochs=1, prefix_init="tokens",
                                                          prefix_projection=True, projection_hidden=8))
    with pytest.raises(ValueError, match="prefix_init 'vocab'"):
        PrefixClassifier(minilm, 2, TrainConfig(prefix_init="vocab"))


def test_probe_start_fits_the_head_alone_on_the_starting_prefix_first(minilm):
    """LP-FT: after the probe stage the head separates the training data on the starting prefix's features, and the
    prefix has not moved; a trainer run with probe_start (prefix lr ~0) keeps that head's accuracy."""
    from ptserve.server.training.classify import _fit_head_alone

    neg = ["the flight was late", "my bag never arrived", "rude staff and a dirty cabin", "cancelled again",
           "worst airline ever", "they lost my luggage"]
    pos = ["great service, thank you", "lovely crew and a smooth flight", "thanks for the upgrade",
           "on time and friendly", "best flight ever", "the staff were wonderful"]
    items_text = [(t, 0) for t in neg] + [(t, 1) for t in pos]
    cfg = TrainConfig(virtual_tokens=4, prefix_init="tokens", seed=0, lr=1e-2)
    model = PrefixClassifier(minilm, 2, cfg)
    ids = tokenize(minilm, [t for t, _ in items_text], 4, None)
    model.prefix.start_from(token_kv(minilm, ids, 4, seed=0))
    before = model.prefix().detach().clone()
    items = list(zip(ids, [y for _, y in items_text]))
    chance = _accuracy(model, ids, items)
    result = _fit_head_alone(model, items, None, cfg, bf16=False)
    assert torch.equal(model.prefix().detach(), before)
    assert len(result.history) == 50 and _accuracy(model, ids, items) == 1.0 > chance  # 12 easy examples
    train = [Example(t, "neg" if y == 0 else "pos") for t, y in items_text]
    run = train_classifier(minilm, train, train, TrainConfig(virtual_tokens=4, epochs=1, prefix_init="tokens",
                                                             probe_start=True, lr=1e-9, head_lr=1e-9, seed=0))
    assert run.eval.accuracy == 1.0  # the probe's head, unmoved by a step of ~0


def _accuracy(model, ids, items) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(ids).argmax(-1)
    return float((pred == torch.tensor([y for _, y in items])).float().mean())
