"""The LLaVA forward pass: splice, supervised-only LM head, KV-cached generation."""
import pytest
import torch
import torch.nn.functional as F

from lgemma.data.collate import build_prompt, build_sample, collate
from lgemma.model import splice_images


def test_splice_puts_visual_tokens_at_placeholders():
    ids = torch.tensor([[5, 9, 9, 7], [9, 9, 3, 3]])
    emb = torch.zeros(2, 4, 2)
    vis = torch.arange(8.).reshape(2, 2, 2)
    out = splice_images(emb, ids, 9, vis)
    assert torch.equal(out[0, 1:3], vis[0]) and torch.equal(out[1, 0:2], vis[1])
    assert out[0, 0].abs().sum() == 0 and out[1, 2:].abs().sum() == 0


@pytest.mark.parametrize("ids", [
    [[5, 9, 7, 7], [9, 9, 3, 3]],      # one sample has too few placeholders
    [[5, 9, 9, 9], [9, 9, 3, 3]],      # too many
    [[5, 9, 9, 7], [1, 2, 3, 3]],      # two images, one sample with placeholders
])
def test_splice_mismatched_placeholder_count_raises(ids):
    with pytest.raises(ValueError, match="placeholder mismatch"):
        splice_images(torch.zeros(2, 4, 2), torch.tensor(ids), 9, torch.ones(2, 2, 2))


def _batch(model, tokenizer, texts, images=True):
    n = model.num_image_tokens
    samples = [build_sample(tokenizer, [(f"<image>\n{q}", a)], n) for q, a in texts]
    items = [{"input_ids": torch.tensor(s.input_ids), "labels": torch.tensor(s.labels),
              "image": torch.randn(3, 64, 64)} for s in samples]
    return collate(items, tokenizer.pad_token_id)


def test_head_only_at_labels_matches_full_logits_loss(tiny_model):
    model, tok = tiny_model
    b = _batch(model, tok, [("What color is the circle?", "red"), ("Describe the image.", "a small blue square.")])
    loss, logits = model(b["input_ids"], b["attention_mask"], b["labels"], b["images"])
    full = model(b["input_ids"], b["attention_mask"], images=b["images"])           # [B, T, V]
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), b["labels"][:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-5)
    assert logits.shape[0] == (b["labels"][:, 1:] != -100).sum()


def test_kv_cached_generation_matches_greedy_without_cache(tiny_model):
    """Batched, left-padded, KV-cached generation equals a per-sample greedy loop that
    recomputes the whole sequence every step."""
    from lgemma.evaluation import answer
    model, tok = tiny_model
    model.eval()
    questions = ["<image>\nWhat color is the circle?", "<image>\nHow many objects are there?"]
    images = torch.randn(2, 3, 64, 64)
    got = answer(model, tok, questions, images, max_new_tokens=6)
    for q, img, text in zip(questions, images, got):
        ids = torch.tensor([build_prompt(tok, q, model.num_image_tokens)])
        out = []
        for _ in range(6):
            logits = model(ids, torch.ones_like(ids), images=img[None])
            nxt = int(logits[0, -1].argmax())
            if nxt in (tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id):
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert text == tok.decode(out, skip_special_tokens=True).strip()


def test_images_without_placeholders_and_placeholders_without_images_raise(tiny_model):
    model, tok = tiny_model
    b = _batch(model, tok, [("What color?", "red")])
    with pytest.raises(ValueError, match="no images"):
        model(b["input_ids"], b["attention_mask"], b["labels"], None)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_loss_and_gradients(tiny_model, mode, monkeypatch):
    """Recomputing activations in the backward pass changes memory, not maths; "selective" keeps
    the matrix products (its policy sees them) and recomputes the rest; eval mode is untouched."""
    import lgemma.model as lm_model
    model, tok = tiny_model
    b = _batch(model, tok, [("What color is the circle?", "red"), ("Describe the image.", "a small blue square.")])
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["images"])
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    ref_loss, ref = loss_and_grads()
    seen = []
    monkeypatch.setattr(lm_model, "_keep_products", lambda ctx, op, *a, **k: seen.append(op) or
                        (lm_model.CheckpointPolicy.MUST_SAVE if op in lm_model.KEPT_OPS
                         else lm_model.CheckpointPolicy.PREFER_RECOMPUTE))
    model.checkpoint_activations(mode)
    assert all(layer.gradient_checkpointing for layer in model.lm.model.layers)
    loss, grads = loss_and_grads()
    assert torch.allclose(loss, ref_loss) and grads.keys() == ref.keys()
    assert all(torch.allclose(grads[k], ref[k], atol=1e-6) for k in ref)
    assert bool(seen) == (mode == "selective") and (not seen or set(seen) & lm_model.KEPT_OPS)
    model.checkpoint_activations("off")
    assert not any(layer.gradient_checkpointing for layer in model.lm.model.layers)
    with pytest.raises(ValueError, match="unknown activation checkpointing"):
        model.checkpoint_activations("some")
