"""Training data: a built-in long-context recall task, and Megatron's own GPT datasets (mock or indexed).

Every source is a map-style dataset whose item ``i`` is a dict of ``[seq_length]`` tensors ``tokens``, ``labels``,
``loss_mask`` and ``position_ids`` (Megatron's GPTDataset keys), so batches depend only on the sample index: all
tensor-parallel ranks read the same samples without a broadcast, and a resumed run continues with the samples an
uninterrupted one would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class RecallTask:
    """Multi-query associative recall over a long sequence.

    Each sequence first lists ``num_pairs`` key-value pairs, then asks for keys again (key, value, key, value,
    ...): the value after a repeated key is only predictable by looking back to where the pair was listed, often
    further back than NSA's sliding window, so the compressed and selected branches have to find it. The loss
    mask marks the recalled values only (chance loss: ln ``num_values``).
    """

    seq_length: int = 1024
    num_pairs: int = 64
    num_keys: int = 256
    num_values: int = 256
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.num_pairs > self.num_keys:
            raise ValueError(f"RecallTask.num_pairs={self.num_pairs} must be <= num_keys={self.num_keys}")
        if 2 * self.num_pairs + 2 > self.seq_length:
            raise ValueError(f"RecallTask.seq_length={self.seq_length} must be >= 2 * num_pairs + 2 = "
                             f"{2 * self.num_pairs + 2}")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        # torch's CPU generator keeps 32 bits of the seed: sample i + 2^32 repeats sample i
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        t, p = self.seq_length + 1, self.num_pairs
        keys = torch.randperm(self.num_keys, generator=gen)[:p]
        values = torch.randint(self.num_keys, self.vocab_size, (p,), generator=gen)
        n_q = (t - 2 * p + 1) // 2
        ask = torch.randint(0, p, (n_q,), generator=gen)
        listing = torch.stack([keys, values], dim=1).reshape(2 * p)
        queries = torch.stack([keys[ask], values[ask]], dim=1).reshape(2 * n_q)
        seq = torch.cat([listing, queries])[:t]
        pos = torch.arange(1, t)
        recalled = (pos >= 2 * p) & ((pos - 2 * p) % 2 == 1)  # target positions holding a queried value
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": recalled.float(),
                "position_ids": torch.arange(self.seq_length)}


class VocabTokenizer:
    """What Megatron's GPT datasets read from a tokenizer, for data that is already token ids."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}

    def tokenize(self, text):  # pragma: no cover - the datasets here are pre-tokenised
        raise NotImplementedError("VocabTokenizer only describes pre-tokenised data")


class _MegatronSamples:
    """Adapts a megatron.core GPTDataset item (numpy or tensors) to the dict of tensors used here."""

    def __init__(self, dataset, vocab_size: int) -> None:
        self.dataset, self.vocab_size = dataset, vocab_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = self.dataset[index % len(self.dataset)]
        out = {k: torch.as_tensor(item[k]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        top = int(torch.maximum(out["tokens"].max(), out["labels"].max()))
        if top >= self.vocab_size:
            raise ValueError(f"sample {index} holds token id {top}, but --vocab-size={self.vocab_size}: ids must be "
                             f"< vocab size (was the data tokenized with a larger vocabulary?)")
        return out


class HeldOut:
    """Samples of an endless generated dataset (the recall task) from index ``2**31`` on, which training never
    reaches: a validation set drawn from the same distribution. (Not further: torch's CPU generator keeps 32 bits
    of a seed, so sample ``i + 2**32`` repeats sample ``i``.)"""

    START = 1 << 31

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.dataset[self.START + int(index)]


def megatron_gpt_dataset(*, data_path: Optional[Sequence[str]], mock: bool, seq_length: int, vocab_size: int,
                         num_samples: int, seed: int, split: str = "100,0,0", valid_samples: int = 0,
                         reset_position_ids: bool = False, eod_mask_loss: bool = False):
    """``(train, valid)``: the training and validation splits of Megatron's GPT dataset over ``data_path``
    (indexed ``.bin``/``.idx`` prefixes, with optional weights as in ``--data-path 0.3 a 0.7 b``; ``split`` gives
    the splits' weights), or Megatron's mock dataset; ``valid`` is None when ``valid_samples`` is 0.
    ``reset_position_ids`` / ``eod_mask_loss``: Megatron's document options (the EOD id is ``vocab_size - 1``);
    attention masking by document is the model's (packed sequences), never a dense mask here."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=None if mock else get_blend_from_list(list(data_path)),
        split=split, tokenizer=VocabTokenizer(vocab_size), reset_position_ids=reset_position_ids,
        reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=False, mmap_bin_files=True)
    cls = MockGPTDataset if mock else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, [num_samples, valid_samples, 0], lambda: True,
                                                    config).build()
    if train is None:
        raise ValueError(f"--data-path {' '.join(data_path or [])} with --split {split} leaves no training data")
    if valid_samples and valid is None:
        raise ValueError(f"--eval-interval needs validation data, but --split {split} leaves none; give the "
                         "validation split a weight, e.g. --split 98,2,0")
    return _MegatronSamples(train, vocab_size), (_MegatronSamples(valid, vocab_size) if valid_samples else None)


def micro_batches(dataset, *, micro_batch_size: int, num_micro_batches: int, data_parallel_rank: int,
                  data_parallel_size: int, start_iteration: int, device: torch.device) -> Iterator[Dict]:
    """Micro-batches for this data-parallel rank, iteration after iteration, from ``start_iteration`` on.

    Iteration ``i`` consumes global samples ``[i * B, (i + 1) * B)`` with ``B`` the global batch
    (``micro_batch_size x num_micro_batches x data_parallel_size``); this rank takes its interleaved share.
    """
    global_batch = micro_batch_size * num_micro_batches * data_parallel_size
    it = start_iteration
    while True:
        for m in range(num_micro_batches):
            first = it * global_batch + (m * data_parallel_size + data_parallel_rank) * micro_batch_size
            items: List[Dict] = [dataset[first + j] for j in range(micro_batch_size)]
            yield {k: torch.stack([x[k] for x in items]).to(device, non_blocking=True) for k in items[0]}
        it += 1
