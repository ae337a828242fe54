"""Retrieval: exact kNN, the k-reciprocal Jaccard distance (plain and camera-aware), re-ranking, the
Market and SYSU-30k protocols, and per-query inspection. Knows nothing of training methods.

The names a notebook or a user needs are importable from the package itself."""

from reidkit.retrieval.ca_jaccard import ca_jaccard_distance
from reidkit.retrieval.distances import pairwise_distance
from reidkit.retrieval.inspect import (
    camera_share_by_rank,
    compare_rankings,
    precision_recall,
    queries_by_outcome,
    ranked_gallery,
)
from reidkit.retrieval.jaccard import jaccard_distance
from reidkit.retrieval.market import evaluate_rank
from reidkit.retrieval.protocol import evaluate_model, extract_records
from reidkit.retrieval.rerank import re_ranking
from reidkit.retrieval.sysu import sysu30k_evaluate

__all__ = ["ca_jaccard_distance", "pairwise_distance", "camera_share_by_rank", "compare_rankings",
           "precision_recall", "queries_by_outcome", "ranked_gallery", "jaccard_distance",
           "evaluate_rank", "evaluate_model", "extract_records", "re_ranking", "sysu30k_evaluate"]
