"""Chat template, <image> expansion and the loss mask."""
import warnings

import pytest
import torch

from lgemma.data.collate import (IGNORE_INDEX, LabelMismatch, LlavaDataset, build_prompt, build_sample, collate,
                                 remove_image, supervised_text)
from lgemma.data.llava_json import DataError, load_records, turns
from lgemma.language import END_TURN, IMAGE_TOKEN

N = 64


def test_unmasked_labels_decode_to_exactly_the_replies(world, tokenizer):
    """On real generated samples (multi-turn instruct and captions), the supervised tokens are
    the replies, each followed by <end_of_turn>, and nothing else."""
    recs = load_records(world / "instruct_train.json")[:40] + load_records(world / "captions.json")[:20]
    for rec in recs:
        s = build_sample(tokenizer, turns(rec), N)
        assert supervised_text(tokenizer, s) == "".join(a + END_TURN for _, a in turns(rec))
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        assert s.input_ids.count(image_id) == N
        # image and prompt tokens never carry a label
        assert all(l == IGNORE_INDEX for t, l in zip(s.input_ids, s.labels) if t == image_id)
        assert s.labels[0] == IGNORE_INDEX


def test_sequence_matches_gemma_chat_template(world, tokenizer):
    """Our span-by-span sequence renders exactly like the tokenizer's Gemma chat template."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for rec in load_records(world / "instruct_train.json")[:20]:
        s = build_sample(tokenizer, turns(rec), 1)
        messages = [m for q, a in turns(rec) for m in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": a})]
        expected = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.decode(s.input_ids) == expected
        assert s.input_ids.count(image_id) == 1


def test_prompt_is_the_training_prefix(world, tokenizer):
    rec = load_records(world / "instruct_heldout.json")[0]
    (q, a), = turns(rec)
    full = build_sample(tokenizer, [(q, a)], N).input_ids
    prompt = build_prompt(tokenizer, q, N)
    assert full[:len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("<start_of_turn>model\n")


def test_label_mismatch_raises(tokenizer):
    from tokenizers import normalizers
    import copy
    lower = copy.deepcopy(tokenizer)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(LabelMismatch, match="decodes back"):
        build_sample(lower, [("<image>\nWhat color?", "Red")], N, where="rec 7")


def test_truncation_is_counted_not_dropped(world, tokenizer):
    recs = load_records(world / "instruct_train.json")[:4]
    ds = LlavaDataset(recs, tokenizer, N, lambda r: torch.zeros(N, 8), max_length=N + 12)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 4 and all(len(it["input_ids"]) == N + 12 for it in items)
    assert len(ds.truncated) == 4 and any("truncated" in str(x.message) for x in w)
    with pytest.raises(DataError, match="cannot even hold"):
        build_sample(tokenizer, turns(recs[0]), N, max_length=N - 5)


def test_collate_pads_right_and_stacks_images(world, tokenizer):
    recs = load_records(world / "instruct_heldout.json")[:3]
    ds = LlavaDataset(recs, tokenizer, N, lambda r: torch.ones(N, 8))
    batch = collate([ds[i] for i in range(3)], tokenizer.pad_token_id)
    assert batch["images"].shape == (3, N, 8)
    lengths = batch["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_remove_image_keeps_the_question():
    assert remove_image("<image>\nWhat color is it?") == "What color is it?"
    assert remove_image("What color is it?\n<image>") == "What color is it?"
