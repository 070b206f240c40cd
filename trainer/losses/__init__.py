"""Training losses over embeddings: each returns named scalar terms; `build_loss` and `CombinedLoss` assemble them."""

from trainer.losses.base import (
    LOSSES,
    CombinedLoss,
    EmbeddingLoss,
    LossInputs,
    build_loss,
    positive_mask,
    register_loss,
)
from trainer.losses.center import CenterLoss, ConceptCenterLoss
from trainer.losses.hierarchical import LocalSimilarityLoss, lexical_similarity
from trainer.losses.info_nce import InfoNCELoss, multi_positive_cross_entropy
from trainer.losses.quantization import QuantizationLoss, binarize, binarize_st, int8_bounds, quantize_int8
from trainer.losses.relation import RelationLoss, RelationModule
from trainer.losses.soft_negative import BCLSLoss, KendallRankLoss, SoftNegativeTripletLoss
from trainer.losses.triplet import AdaptiveMarginTripletLoss, VSEPPTripletLoss, anchor_hinge, vsepp_hinge
from trainer.losses.unit import UnitHingeLoss

__all__ = [
    "LOSSES",
    "AdaptiveMarginTripletLoss",
    "BCLSLoss",
    "CenterLoss",
    "CombinedLoss",
    "ConceptCenterLoss",
    "EmbeddingLoss",
    "InfoNCELoss",
    "KendallRankLoss",
    "LocalSimilarityLoss",
    "LossInputs",
    "QuantizationLoss",
    "RelationLoss",
    "RelationModule",
    "SoftNegativeTripletLoss",
    "UnitHingeLoss",
    "VSEPPTripletLoss",
    "anchor_hinge",
    "binarize",
    "binarize_st",
    "build_loss",
    "int8_bounds",
    "lexical_similarity",
    "multi_positive_cross_entropy",
    "positive_mask",
    "quantize_int8",
    "register_loss",
    "vsepp_hinge",
]
