"""Training data: the synthetic shapes task and LLaVA/ShareGPT4V conversation JSON (dataset + collator)."""

from .conversations import Collator, ConversationDataset, DataError, build_messages, read_records
from .shapes import ShapesStream, make_sample, write_split

__all__ = ["Collator", "ConversationDataset", "DataError", "ShapesStream", "build_messages", "make_sample",
           "read_records", "write_split"]
