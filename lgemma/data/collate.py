"""From a LLaVA conversation to `input_ids` and `labels`: the chat template, the `<image>`
placeholder, and the loss mask.

We build the sequence from spans we tokenize and concatenate ourselves, and mark each span
as supervised or not. Labels are therefore exact by construction: no re-tokenizing of the
whole prompt to guess where the answer starts (the cause of LLaVA's "tokenization
mismatch" warnings, which silently zeroed samples). Gemma's turn format:

    <bos><start_of_turn>user\n<image>\nWhat color is the circle?<end_of_turn>\n
    <start_of_turn>model\nred<end_of_turn>\n
                         ^^^^^^^^^^^^^^^^ the only supervised tokens

`<image>` is expanded to N copies of the image token id (one per visual token), which the
model later replaces with the projected patch features.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..language import END_TURN, IMAGE_TOKEN, START_TURN
from .llava_json import DataError, split_image_placeholder, turns

IGNORE_INDEX = -100


class LabelMismatch(DataError):
    """The supervised tokens do not decode to the assistant reply."""


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    truncated: int = 0  # how many tokens were cut from the end


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (one span of a sample)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_sample(tokenizer, conversation: list[tuple[str, str]], num_image_tokens: int | None,
                 max_length: int | None = None, where: str = "sample") -> Sample:
    """Tokenize (human, gpt) turns into a training sample with labels on the replies only.

    `num_image_tokens=None` means the conversation has no image (and must hold no `<image>`).
    Raises `LabelMismatch` if a reply does not survive tokenization exactly.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]

    def add(span_ids, supervised):
        ids.extend(span_ids)
        labels.extend(span_ids if supervised else [IGNORE_INDEX] * len(span_ids))

    for i, (human, gpt) in enumerate(conversation):
        prefix = f"{START_TURN}user\n"
        if i == 0 and num_image_tokens is not None:
            before, after = split_image_placeholder(human)  # "<image>\nQ" -> ("", "Q")
            add(encode_text(tokenizer, prefix + before + ("\n" if before else "")), False)
            add([image_id] * num_image_tokens, False)
            human = ("\n" if after else "") + after
            prefix = ""
        add(encode_text(tokenizer, f"{prefix}{human}{END_TURN}\n{START_TURN}model\n"), False)
        reply = encode_text(tokenizer, gpt)
        if tokenizer.decode(reply) != gpt:
            raise LabelMismatch(f"{where}, turn {i}: reply {gpt!r} decodes back as "
                                f"{tokenizer.decode(reply)!r}; the tokenizer changes this text, fix the data "
                                f"or the tokenizer's normalizer")
        add(reply + encode_text(tokenizer, END_TURN), True)  # the model also learns to stop
        add(encode_text(tokenizer, "\n"), False)

    truncated = 0
    if max_length is not None and len(ids) > max_length:
        if num_image_tokens and ids.index(image_id) + num_image_tokens > max_length:
            raise DataError(f"{where}: max_length={max_length} cannot even hold the {num_image_tokens} image "
                            f"tokens; raise data.max_length")
        truncated = len(ids) - max_length
        ids, labels = ids[:max_length], labels[:max_length]
    return Sample(ids, labels, truncated)


def build_prompt(tokenizer, question: str, num_image_tokens: int | None,
                 history: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a prompt ending in `<start_of_turn>model\\n`, ready for generation.
    Built by the same code as training samples, so train and test see identical spans."""
    sample = build_sample(tokenizer, [*history, (question, "")], num_image_tokens)
    n_tail = len(encode_text(tokenizer, END_TURN)) + len(encode_text(tokenizer, "\n"))
    return sample.input_ids[:-n_tail]


def remove_image(question: str) -> str:
    """The question with its `<image>` placeholder (and the newline beside it) removed: the
    blind baseline's prompt."""
    before, after = split_image_placeholder(question)
    return "\n".join(p for p in (before, after) if p)


def supervised_text(tokenizer, sample: Sample) -> str:
    """Decode the tokens that carry a loss (tests compare it with the replies)."""
    return tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


class LlavaDataset(Dataset):
    """LLaVA records -> tokenized samples with their image (pixels or cached features).

    `image_source(record) -> Tensor` returns pixels [3,S,S] or features [N,D] for a record
    with an `image`; text-only records get none. Truncations are counted in `truncated`.
    """

    def __init__(self, records: list[dict], tokenizer, num_image_tokens: int, image_source,
                 max_length: int | None = None, where: str = "dataset", prior=None):
        self.records, self.tokenizer, self.prior = records, tokenizer, prior  # prior: lgemma.debias.QuestionPrior
        self.num_image_tokens, self.image_source = num_image_tokens, image_source
        self.max_length, self.where = max_length, where
        self.truncated: dict[int, int] = {}  # record index -> tokens cut
        self._tokens: dict[int, tuple] = {}    # record index -> (input_ids, labels): tokenized once, not every epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        has_image = "image" in rec
        if i not in self._tokens:
            where = f"{self.where} record {rec.get('id', i)!r}"
            s = build_sample(self.tokenizer, turns(rec), self.num_image_tokens if has_image else None,
                             self.max_length, where)
            if s.truncated:
                self.truncated[i] = s.truncated
                warnings.warn(f"{where}: {s.truncated} tokens over max_length={self.max_length} were truncated "
                              f"(kept, not dropped); {len(self.truncated)} truncated so far")
            self._tokens[i] = (torch.tensor(s.input_ids), torch.tensor(s.labels))
        input_ids, labels = self._tokens[i]
        item = {"input_ids": input_ids, "labels": labels}
        if self.prior is not None:
            item["prior"] = self.prior.sample_bias(rec, labels)
        if has_image:
            item["image"] = self.image_source(rec)
        return item


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a list of samples; images of the samples that have one are stacked in order."""
    n = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[i, :k], labels[i, :k], attention_mask[i, :k] = b["input_ids"], b["labels"], 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    images = [b["image"] for b in batch if "image" in b]
    if images:
        out["images"] = torch.stack(images)
    if "prior" in batch[0]:  # training against the question-only prior (lgemma.debias)
        from ..debias import collate_bias
        out.update(collate_bias(batch))
    return out
