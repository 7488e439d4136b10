"""Training against the question-only prior (lgemma.debias): the counted prior, where its bias lands,
and the product-of-experts loss."""
import pytest
import torch
import torch.nn.functional as F

from lgemma.config import StageConfig
from lgemma.data.collate import IGNORE_INDEX, LlavaDataset, collate
from lgemma.data.llava_json import load_records
from lgemma.data.shapes import HELDOUT_COMBOS, TEMPLATES
from lgemma.debias import QuestionPrior, product_loss, shapesworld_type
from lgemma.training import set_trainable, train_stage


def test_question_types_follow_shapesworld_templates():
    assert shapesworld_type("What shape is the red object?") == "shape"
    assert shapesworld_type("What is the color of the large triangle?") == "color"
    assert shapesworld_type("Relative to the blue square, where is the red circle?") == "spatial"
    assert shapesworld_type("How many green objects are in the image?") == "count_color"
    assert shapesworld_type("Why is the sky blue?") is None


def test_the_prior_rules_out_the_pairs_training_never_shows(world, tokenizer):
    prior = QuestionPrior(load_records(world / "instruct_train.json"), tokenizer)
    tid = lambda w: tokenizer(w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    checked = 0
    for color, shape in HELDOUT_COMBOS:  # never in a training image
        asked = [(t.format(ref=f"{color} object"), shape) for t in TEMPLATES["shape"]]
        asked += [(t.format(ref=shape), color) for t in TEMPLATES["color"]]
        for question, never in asked:
            if question not in prior.by_question:
                continue
            bias = dict(zip(*prior.bias(question)))
            assert tid(never) in bias and bias[tid(never)] < -1, (question, bias)
            assert max(bias.values()) > bias[tid(never)] + 1
            checked += 1
    assert checked >= 4
    assert prior.bias("Why is the sky blue?") == ([], [])


def test_the_bias_sits_on_each_replys_first_token(world, tokenizer):
    recs = load_records(world / "instruct_train.json")[:8]
    prior = QuestionPrior(load_records(world / "instruct_train.json"), tokenizer)
    ds = LlavaDataset(recs, tokenizer, 4, lambda r: torch.zeros(4, 8), prior=prior)
    b = collate([ds[i] for i in range(len(ds))], tokenizer.pad_token_id)
    assert b["prior_pos"].numel() > 0
    labels = b["labels"]
    for i, p, v in zip(b["prior_sample"].tolist(), b["prior_pos"].tolist(), b["prior_token"].tolist()):
        assert labels[i, p] != IGNORE_INDEX and labels[i, p - 1] == IGNORE_INDEX
    # at the reply's first token, the true answer is among the biased tokens
    firsts = {(i, p) for i, p in zip(b["prior_sample"].tolist(), b["prior_pos"].tolist())}
    for i, p in firsts:
        rows = (b["prior_sample"] == i) & (b["prior_pos"] == p)
        assert int(labels[i, p]) in b["prior_token"][rows].tolist()


def test_product_loss_is_cross_entropy_plus_the_bias(world, tokenizer):
    recs = load_records(world / "instruct_train.json")[:4]
    prior = QuestionPrior(load_records(world / "instruct_train.json"), tokenizer)
    ds = LlavaDataset(recs, tokenizer, 4, lambda r: torch.zeros(4, 8), prior=prior)
    b = collate([ds[i] for i in range(len(ds))], tokenizer.pad_token_id)
    keep = b["labels"][:, 1:] != IGNORE_INDEX
    logits = torch.randn(int(keep.sum()), len(tokenizer), generator=torch.Generator().manual_seed(0))
    plain = F.cross_entropy(logits, b["labels"][:, 1:][keep])
    zero = {**b, "prior_value": torch.zeros_like(b["prior_value"])}
    assert torch.allclose(product_loss(logits, b["labels"], zero), plain)
    assert torch.allclose(product_loss(logits, b["labels"], b, weight=0.0), plain)  # a weight of 0 is no prior
    # by hand: add each bias to its row of logits
    rows = keep.flatten().cumsum(0).view_as(keep) - 1
    biased = logits.clone()
    for i, p, v, x in zip(*(b[k].tolist() for k in ("prior_sample", "prior_pos", "prior_token", "prior_value"))):
        biased[rows[i, p - 1], v] += x
    assert torch.allclose(product_loss(logits, b["labels"], b), F.cross_entropy(biased, b["labels"][:, 1:][keep]))
    half = (biased - logits) * 0.5 + logits
    assert torch.allclose(product_loss(logits, b["labels"], b, weight=0.5), F.cross_entropy(half, b["labels"][:, 1:][keep]))


def test_debias_is_checked_and_trains_a_few_real_steps(tiny_model, world, tmp_path):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="unknown debias"):
        set_trainable(model, "instruct", StageConfig(debias="rubi"))
    with pytest.raises(ValueError, match="0 or more"):
        set_trainable(model, "instruct", StageConfig(debias="question_prior", debias_weight=-1))
    with pytest.raises(ValueError, match="for stage 2"):
        set_trainable(model, "align", StageConfig(debias="question_prior"))
    recs = load_records(world / "instruct_train.json")[:32]
    prior = QuestionPrior(load_records(world / "instruct_train.json"), tok)
    ds = LlavaDataset(recs, tok, model.num_image_tokens, lambda r: torch.zeros(3, 64, 64), prior=prior)
    info = train_stage(model, "instruct", StageConfig(steps=3, batch_size=8, lr=1e-3, lm_lr=1e-3,
                                                      debias="question_prior"),
                       ds, tmp_path, trainer_kwargs=dict(enable_progress_bar=False, logger=False))
    assert info["steps"] == 3 and info["final_loss"] == info["final_loss"]  # ran, and the loss is a number
