"""Analyses of trained models over whole documents (uses `data` and `models`)."""

from keras_memtrans.analysis.document_scorer import DocumentScorer
