"""The training data stream: the dataset a config names and a sampler that resumes at any position."""

from __future__ import annotations

from pathlib import Path

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """Endless sample indices: position p of the stream is a pure function of (seed, p), so a run
    resumes by starting at the number of samples already consumed.

    Endless data (size None, the shapes stream): index = p, a fresh image each time.
    A dataset of `size` records: epoch e = p // size visits a permutation seeded by (seed, e).
    Under accelerate each process takes every num_processes-th batch of this one stream.
    """

    def __init__(self, size: int | None, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self):
        position, epoch, order = self.start, None, None
        while True:
            if self.size is None:
                yield position
            else:
                if position // self.size != epoch:
                    epoch = position // self.size
                    generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                    order = torch.randperm(self.size, generator=generator)
                yield int(order[position % self.size])
            position += 1


def build_dataset(data: str, seed: int, image_size: int, image_root: str | None = None):
    """'shapes' / 'shapes-v2' (the endless synthetic streams) or a conversation JSON file."""
    from ..data.conversations import ConversationDataset
    from ..data.shapes import ShapesStream

    if data == "shapes":
        return ShapesStream(seed=seed, image_size=image_size)
    if data == "shapes-v2":
        from ..data.shapes_v2 import ShapesV2Stream

        return ShapesV2Stream(seed=seed)
    path = Path(data)
    if path.suffix != ".json" or not path.is_file():
        raise ValueError(f"data must be 'shapes-v2', 'shapes' or an existing conversation .json file, got {data!r}")
    return ConversationDataset(path, image_root)


def build_loader(dataset, processor, batch_size: int, seed: int, start: int, max_length: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches of the stream from sample position `start` on, collated for the processor's model."""
    from ..llava.training import collator

    size = len(dataset) if hasattr(dataset, "__len__") else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                                       sampler=ResumableSampler(size, seed, start),
                                       collate_fn=collator(processor, max_length))
