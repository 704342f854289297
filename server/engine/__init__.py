"""Pure-ML engine: strategies, backbones and metrics (DESIGN.md sections 4 and 5).

Imports torch, numpy, torchvision (ResNets) and scikit-learn (the MIA) only; never grpc, sqlalchemy or prometheus.
The last two are imported where they are used, so a server that needs neither starts without them.
"""

from server.engine import metrics
from server.engine.backbones import BACKBONES, build_backbone, detach_head, head_name_of
from server.engine.finetune import FinetunePredictor, FinetuneStrategy, build_finetune
from server.engine.protocol import (
    LearnOptions,
    Predictor,
    Progress,
    Report,
    Strategy,
    TaskData,
    TemporaryLearning,
    UnknownTaskError,
    UnlearnedTaskError,
    no_progress,
    supports_temporary,
)
from server.engine.registry import STRATEGIES, build_strategy, resolve_device, strategy_options

__all__ = [
    "BACKBONES",
    "STRATEGIES",
    "FinetunePredictor",
    "FinetuneStrategy",
    "LearnOptions",
    "Predictor",
    "Progress",
    "Report",
    "Strategy",
    "TaskData",
    "TemporaryLearning",
    "UnknownTaskError",
    "UnlearnedTaskError",
    "build_backbone",
    "build_finetune",
    "build_strategy",
    "detach_head",
    "head_name_of",
    "metrics",
    "no_progress",
    "resolve_device",
    "strategy_options",
    "supports_temporary",
]
