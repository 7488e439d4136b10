"""lgemma.alignment on the random tiny model: the measurements notebook 01 relies on."""
import json
import math

import pytest
import torch

from lgemma import alignment
from lgemma.data.collate import build_sample
from lgemma.data.llava_json import turns


@pytest.fixture
def pixels(tiny_model):
    model, _ = tiny_model
    torch.manual_seed(1)
    s = model.vision.image_size
    return torch.randn(3, 3, s, s)


CAPTIONS = ["a large red circle.", "a small blue square and a large green circle.", "a small yellow triangle."]


def test_caption_logprobs_matches_one_pair_at_a_time(tiny_model, pixels):
    model, tok = tiny_model
    scores = alignment.caption_logprobs(model, tok, pixels, CAPTIONS, batch_size=4)  # batches cut across rows
    assert scores.shape == (3, 3)
    for i in range(3):
        for j, caption in enumerate(CAPTIONS):
            s = build_sample(tok, [(alignment.CAPTION_PROMPT, caption)], model.num_image_tokens)
            labels = torch.tensor([s.labels])
            with torch.no_grad():
                loss, _ = model(torch.tensor([s.input_ids]), None, labels, pixels[i:i + 1])
            n = int((labels[:, 1:] != -100).sum())
            assert scores[i, j].item() == pytest.approx(-loss.item() * n, rel=1e-4, abs=1e-4)
    mean = alignment.caption_logprobs(model, tok, pixels, CAPTIONS, per_token=True)
    lengths = [len(build_sample(tok, [(alignment.CAPTION_PROMPT, c)], model.num_image_tokens).labels)
               - build_sample(tok, [(alignment.CAPTION_PROMPT, c)], model.num_image_tokens).labels.count(-100)
               for c in CAPTIONS]
    torch.testing.assert_close(mean * torch.tensor(lengths, dtype=torch.float), scores, rtol=1e-4, atol=1e-4)


def test_caption_logprobs_accepts_tower_features(tiny_model, pixels):
    model, tok = tiny_model
    a = alignment.caption_logprobs(model, tok, pixels, CAPTIONS[:2])
    b = alignment.caption_logprobs(model, tok, model.vision(pixels), CAPTIONS[:2])
    torch.testing.assert_close(a, b)


def test_retrieval_accuracy_on_a_hand_made_matrix():
    scores = torch.tensor([[3.0, 1.0, 0.0],
                           [0.0, 1.0, 2.0],
                           [0.0, 0.0, 5.0]])
    assert alignment.retrieval_accuracy(scores, [0, 1, 2]) == pytest.approx(2 / 3)
    assert alignment.retrieval_accuracy(scores, torch.tensor([0, 2, 2])) == 1.0
    with pytest.raises(ValueError, match="rows"):
        alignment.retrieval_accuracy(scores, [0, 1])


def test_accuracy_difference():
    d, half = alignment.accuracy_difference(0.8, 100, 0.6, 100)
    assert d == pytest.approx(0.2)
    assert half == pytest.approx(1.96 * math.sqrt(0.8 * 0.2 / 100 + 0.6 * 0.4 / 100))


def test_nearest_vocab_of_an_embedding_row_is_that_token(tiny_model):
    model, tok = tiny_model
    table = model.lm.get_input_embeddings().weight
    ids = [tok.convert_tokens_to_ids(t) for t in ("red", "Ġcircle", "Ġblue")]
    assert tok.unk_token_id not in ids
    rows = table[ids].detach() * 7.0  # cosine: the length does not matter
    nb = alignment.nearest_vocab(model, tok, rows[None], k=3)  # [1, 3, D] is flattened to 3 queries
    assert nb.ids.shape == (3, 3) and nb.cosine.shape == (3, 3)
    assert nb.ids[:, 0].tolist() == ids
    assert nb.cosine[:, 0] == pytest.approx(1.0, abs=1e-5)
    assert [t[0] for t in nb.tokens] == [tok.decode([i]) for i in ids]
    image_id = model.image_token_id
    special = alignment.nearest_vocab(model, tok, table[image_id].detach(), k=2)
    assert image_id not in special.ids.tolist()[0]
    assert alignment.nearest_vocab(model, tok, table[image_id].detach(), k=1, skip_special=False).ids.item() == image_id


def test_gemma_scales_token_embeddings_inside_the_embedding_module(tiny_model):
    """What notebook 01 teaches: the sqrt(hidden) factor is applied at lookup, not to
    `inputs_embeds`, so visual tokens spliced after the lookup are not scaled."""
    model, tok = tiny_model
    lm = model.lm
    scale = alignment.embedding_scale(lm)
    assert scale == pytest.approx(math.sqrt(lm.config.hidden_size))
    ids = torch.tensor([tok("a large red circle.", add_special_tokens=False)["input_ids"]])
    emb = lm.get_input_embeddings()
    torch.testing.assert_close(emb(ids), emb.weight[ids] * scale)
    with torch.no_grad():
        from_ids = lm.model(input_ids=ids).last_hidden_state
        from_embeds = lm.model(inputs_embeds=emb(ids)).last_hidden_state
        from_raw = lm.model(inputs_embeds=emb.weight[ids]).last_hidden_state
    torch.testing.assert_close(from_ids, from_embeds)
    assert not torch.allclose(from_ids, from_raw, atol=1e-3)


def test_token_norms(tiny_model, pixels):
    model, tok = tiny_model
    text = "a large red circle."
    n = alignment.token_norms(model, tok, pixels[:2], text)
    n_text = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n["visual"].shape == (2 * model.num_image_tokens,) and n["text"].shape == (n_text,)
    scale = alignment.embedding_scale(model.lm)
    torch.testing.assert_close(n["visual_scaled"], n["visual"] * scale)
    torch.testing.assert_close(n["text"], n["text_unscaled"] * scale)
    torch.testing.assert_close(n["visual"], model.visual_tokens(pixels[:2]).detach().norm(dim=-1).flatten())
    with pytest.raises(ValueError, match="at least one token"):
        alignment.token_norms(model, tok, pixels[:1], "")


def test_caption_set_gives_the_canonical_captions(world):
    from lgemma.config import get_preset
    cfg = get_preset("tiny")
    cfg.data.root = str(world)
    recs = alignment.caption_set(cfg, "train", 8)
    assert len(recs) == 8 and len({r["caption"] for r in recs}) == 8
    stage1 = {r["id"]: turns(r)[0][1] for r in json.loads((world / "captions.json").read_text())}
    for r in recs:
        assert r["caption"] == stage1[r["id"]]
        assert (world / r["image"]).exists()
    assert alignment.caption_set(cfg, "heldout", 3)[0]["image"].startswith("images/heldout/")
    with pytest.raises(ValueError, match="no images"):
        alignment.caption_set(cfg, "nosuchsplit")


def test_load_stage_rejects_unknown_stages():
    from lgemma.config import get_preset
    with pytest.raises(ValueError, match="unknown stage"):
        alignment.load_stage(get_preset("tiny"), "stage3")
