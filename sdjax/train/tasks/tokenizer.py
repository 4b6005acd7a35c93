"""Task "tokenizer": BPE merges learnt from the training captions (no gradient steps). Its export is the
tokenizer/ folder that the later from-scratch stages read."""

from __future__ import annotations

import ml_collections

from sdjax import storage
from sdjax.data.source import all_captions
from sdjax.train.tasks.task import Task, refuse_latent_cache

check = refuse_latent_cache


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
    return Task(fit=lambda: fit_tokenizer(config, workdir))


def fit_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Task "tokenizer": learns BPE merges from the captions of data.split and writes the tokenizer
    to workdir/export (vocab.json + merges.txt, read like any checkpoint's). Returns the folder."""
    from sdjax.tokenizer import train_tokenizer

    folder = storage.join(workdir, "export")
    if not storage.is_complete_folder(folder):
        texts = all_captions(config.data, config.tokenizer.num_captions)
        merges = None if config.tokenizer.num_merges < 0 else config.tokenizer.num_merges
        storage.remove(folder)  # what a cut-off upload left
        with storage.staged_folder(folder) as staging:  # complete or absent, like every export
            tokenizer = train_tokenizer(texts, staging, merges, config.tokenizer.min_frequency)
        print(f"tokenizer: {len(tokenizer)} tokens learnt from {len(texts)} captions, written to {folder}")
    return folder
