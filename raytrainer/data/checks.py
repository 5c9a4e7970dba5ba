"""The train dataset looked at on the driver, before any training process or worker starts.

A malformed dataset otherwise fails deep inside a collator, an embedding or a worker ("expected
sequence of length 3 at dim 1", "index out of range in self", "vars() argument must have __dict__
attribute"). Here the first rows of a map-style dataset (a list, an HF `datasets.Dataset`, a torch
Dataset) and a Ray Dataset's schema are checked against what the model and the collator need, and
the error names train_dataset, the row and the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from .ray_data import is_ray_dataset

SAMPLE_ROWS = 8
LABEL_COLUMNS = {"label", "labels", "label_ids"}


def check_train_dataset(trainer) -> None:
    model, dataset = trainer.model, trainer.train_dataset
    if dataset is None:
        return
    if is_ray_dataset(dataset):
        _check_columns(model, set(dataset.schema().names), trainer.data_collator)
        return
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        return  # an iterable dataset: its rows exist only once it is iterated
    if len(dataset) == 0:
        raise ValueError("num_samples should be a positive integer value, but got num_samples=0: train_dataset is "
                         "empty, it has no rows to train on.")
    rows = [dataset[i] for i in range(min(SAMPLE_ROWS, len(dataset)))]
    default = _is_default_collator(trainer.data_collator)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) and default:
            raise ValueError(
                f"train_dataset[{i}] is {type(row).__name__} {_short(row)}; the default collator needs a dict of "
                "model inputs per row (e.g. {'input_ids': [...], 'labels': [...]}): tokenize the dataset, or pass "
                "a data_collator that turns these rows into a batch."
            )
    if not default or not isinstance(rows[0], Mapping):
        return  # a custom collator decides what a row is
    columns = set(rows[0])
    if hasattr(dataset, "column_names"):
        columns = set(dataset.column_names)
    _check_columns(model, columns, trainer.data_collator)
    _check_token_ids(model, rows, trainer.data_collator)


def _check_columns(model, columns: set, collator) -> None:
    if model is None or not _is_default_collator(collator):
        return
    params = set(inspect.signature(model.forward).parameters) - {"self", "kwargs"}
    main_input = getattr(model, "main_input_name", None)
    if main_input in params and main_input not in columns:
        raise ValueError(
            f"train_dataset has no {main_input!r} column (it has {sorted(columns)}), which "
            f"{type(model).__name__}.forward needs: tokenize the dataset or pass a data_collator that makes it."
        )
    if params and not (columns & (params | LABEL_COLUMNS)):
        raise ValueError(
            f"train_dataset columns {sorted(columns)} contain none of the inputs {type(model).__name__}.forward "
            f"accepts ({', '.join(sorted(params)[:8])}, ...): tokenize the dataset or pass a data_collator."
        )


def _check_token_ids(model, rows, collator) -> None:
    import numpy as np

    from transformers.data.data_collator import DataCollatorWithPadding

    # input_ids are token ids only when they index an embedding: a custom nn.Module may take float features
    # under that name (transformers runs it), so the dtype and vocabulary checks need the embedding
    embedding = _input_embedding(model)
    vocab = embedding.num_embeddings if embedding is not None else None
    lengths = set()
    for i, row in enumerate(rows):
        ids = row.get("input_ids")
        if ids is None:
            continue
        try:
            array = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
        except ValueError:  # ragged nested lists
            array = np.asarray([], dtype=object)
        if embedding is not None and array.dtype.kind not in "iu" and not (array.dtype.kind == "b" or array.size == 0 and array.dtype.kind == "f"):
            raise ValueError(
                f"train_dataset[{i}]['input_ids'] is {_short(ids)}: token ids must be integers; tokenize the "
                "text column with the model's tokenizer (processing_class) first."
            )
        if vocab and array.size and (array.min() < 0 or array.max() >= vocab):
            raise ValueError(
                f"index out of range in self: train_dataset[{i}]['input_ids'] holds token id {int(array.max() if array.max() >= vocab else array.min())} "
                f"outside the model's vocabulary [0, {vocab}): tokenize with the model's own tokenizer, or resize "
                "the embeddings (model.resize_token_embeddings)."
            )
        lengths.add(array.shape[-1] if array.ndim else 0)
    if len(lengths) > 1 and not isinstance(collator, DataCollatorWithPadding):
        raise ValueError(
            f"train_dataset rows have input_ids of different lengths ({', '.join(map(str, sorted(lengths)))}) and the "
            "default collator cannot pad them: pad when tokenizing (padding='max_length'), or pass "
            "data_collator=DataCollatorWithPadding(tokenizer) (DataCollatorForLanguageModeling for causal LM)."
        )


def _input_embedding(model):
    import torch

    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    return emb if isinstance(emb, torch.nn.Embedding) else None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_default_collator(collator) -> bool:
    from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator

    return collator is None or collator is default_data_collator or isinstance(collator, DataCollatorWithPadding)

