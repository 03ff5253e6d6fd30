"""ecdlm model package: pure PyTorch, single-device code (no DeepSpeed import anywhere here)."""
from .config import (CapacityConfig, ConfigError, DiffusionConfig, ModelArchConfig, ModelConfig,
                     MoEConfig, from_dict)
from .diffusion import (DiffusionLoss, Masked, diffusion_loss, forward_loss, loss_by_ratio_bin,
                        mask_tokens, stratified_u, time_from_u, TrainingForward, uniform_u)
from .transformer import DiffusionTransformer, ModelOutput

__all__ = ["CapacityConfig", "ConfigError", "DiffusionConfig", "ModelArchConfig", "ModelConfig",
           "MoEConfig", "from_dict", "DiffusionLoss", "Masked", "diffusion_loss", "forward_loss",
           "loss_by_ratio_bin", "mask_tokens", "stratified_u", "time_from_u", "TrainingForward", "uniform_u",
           "DiffusionTransformer", "ModelOutput"]
