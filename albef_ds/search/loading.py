"""The model of the search commands: any checkpoint with an ITM head, loaded as evaluation loads
it, with its identity (store.model_identity); for an index, the checkpoint it was made with,
refused when its identity is not the index's."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..checkpoint.loading import load_inference_model
from ..cli import eval_text_lengths
from ..config import ConfigError
from ..models import ALBEF
from ..tokenizer import build_tokenizer
from .store import StoredIndex, model_identity


@dataclass
class SearchModel:
    model: object
    tokenizer: object
    identity: str
    max_tokens: int
    max_words: int
    record: dict              # what the index keeps of the checkpoint: path, config, identity


def load_search_model(checkpoint: str, config: Optional[str], device, trusted: bool = False) -> SearchModel:
    """ConversionError / ConfigError naming the checkpoint when it cannot be read or has no ITM head."""
    model = load_inference_model(checkpoint, config=config, device=device, trusted=trusted)
    if not isinstance(model, ALBEF):
        raise ConfigError(f"{checkpoint} holds a {type(model).__name__}, which has no ITM head: indexing and search "
                          "need an ALBEF model (pretraining, retrieval or grounding)")
    identity = model_identity(model)
    max_tokens, max_words = eval_text_lengths(config, model)
    config_record = os.path.abspath(config) if config and os.path.isfile(config) else config
    return SearchModel(model, build_tokenizer(model.cfg.text.tokenizer), identity, max_tokens, max_words,
                       {"path": os.path.abspath(checkpoint), "config": config_record, "identity": identity})


def load_for_index(index: StoredIndex, name: str, device, checkpoint: Optional[str] = None,
                   config: Optional[str] = None, trusted: bool = False) -> SearchModel:
    """The model an index was made with (`checkpoint`: the same weights elsewhere), with the
    index's text lengths. ConfigError naming `name` (the index as the user gave it) when the
    checkpoint is gone or holds another model."""
    made_with = index.manifest["checkpoint"]
    path = checkpoint or made_with["path"]
    if not os.path.exists(path):
        raise ConfigError(f"{name} was made with {path}, which is not there any more: give --checkpoint")
    loaded = load_search_model(path, config if config is not None else made_with["config"], device, trusted)
    check_model(index, name, loaded)
    loaded.max_tokens, loaded.max_words = index.plan["max_tokens"], index.plan["max_words"]
    return loaded


def check_model(index: StoredIndex, name: str, loaded: SearchModel) -> None:
    if loaded.identity != index.identity:
        raise ConfigError(f"{name} was made by another model ({index.manifest['checkpoint']['path']}, identity "
                          f"{index.identity[:12]}) than {loaded.record['path']} (identity {loaded.identity[:12]}): "
                          "search it with the model that made it, or index the collection with this one")
