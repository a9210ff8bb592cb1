"""Data: byte tokenizer, document sources (embedded corpus, token files, synthetic), packing, loader."""
from __future__ import annotations

from seqpar.data.documents import ArrayDocuments, DocumentSource
from seqpar.data.loader import MicroBatch, PackedLoader
from seqpar.data.packing import IGNORE_INDEX, PackedSequences
from seqpar.data.synthetic import SyntheticDocuments, synthetic_lengths
from seqpar.data.token_file import TokenFile
from seqpar.data.tokenizer import EOS_ID, VOCAB_SIZE, decode, encode

DATASETS = ("embedded", "token_file", "synthetic")

# corpus and prepare are also `python -m` entry points; importing them here eagerly would make
# runpy execute them twice (and warn), so corpus loads on first use and prepare is not re-exported
# (as an attribute of this package, `prepare` names the submodule: use seqpar.data.prepare.prepare)
_LAZY = {"EmbeddedCorpus": "corpus", "load_embedded_corpus": "corpus"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"seqpar.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'seqpar.data' has no attribute {name!r}")


def build_source(data_cfg):
    """The document source that `data_cfg.name` selects."""
    name = data_cfg.name
    if name == "embedded":
        from seqpar.data.corpus import EmbeddedCorpus
        return EmbeddedCorpus()
    if name == "token_file":
        if not getattr(data_cfg, "path", None):
            raise ValueError("data.name=token_file needs data.path=DIR "
                             "(make one with `seqpar-prepare FILES --out DIR`)")
        return TokenFile(data_cfg.path)
    if name == "synthetic":
        seed = getattr(data_cfg, "seed", 0)
        lengths = synthetic_lengths(data_cfg.num_tokens, data_cfg.distribution, seed=seed,
                                    mean_len=getattr(data_cfg, "mean_len", 1024), sigma=getattr(data_cfg, "sigma", 1.0),
                                    max_len=getattr(data_cfg, "max_len", None),
                                    lengths_file=getattr(data_cfg, "lengths_file", None))
        return SyntheticDocuments(lengths, seed=seed)
    raise ValueError(f"data.name={name!r}: choose one of {', '.join(DATASETS)}")


def build_dataset(data_cfg, seq_len: int) -> PackedSequences:
    return PackedSequences(build_source(data_cfg), seq_len)


__all__ = [
    "ArrayDocuments", "DATASETS", "DocumentSource", "EOS_ID", "EmbeddedCorpus", "IGNORE_INDEX", "MicroBatch",
    "PackedLoader", "PackedSequences", "SyntheticDocuments", "TokenFile", "VOCAB_SIZE", "build_dataset",
    "build_source", "decode", "encode", "load_embedded_corpus", "synthetic_lengths",
]
