"""Deterministic offline image-text corpus for CLIP pretraining and VLM tuning.

`build.build_corpus(CorpusConfig(...))` writes images, caption and question
files from Debian-packaged sources; see docs/corpus.md for the layout.
"""

from training.corpus.build import CorpusConfig, build_corpus

__all__ = ["CorpusConfig", "build_corpus"]
