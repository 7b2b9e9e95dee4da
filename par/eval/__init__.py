"""Evaluation: zero-shot classification (CA, ASR), retrieval (recall@k, retrieval ASR), robust accuracy
(APGD), and the metrics they share (``metrics``)."""
