"""GRACE's losses (gated DKD, relational CKA; CE and plain KD beside them), the adaptive IB controller and QAT
fake quantization."""

from .cka import linear_cka
from .fake_quant import (FakeQuantLinear, QATConfig, apply_qat, fake_quant_modules, fake_quantize, freeze_vision,
                         init_log_scale_mse, mean_quant_scale, qat_param_groups, qat_state_dict, qat_target_names,
                         strip_qat)
from .gated_dkd import gated_dkd_loss, teacher_confidence_gate
from .hidden import LayerCapture, capture_layer_output, decoder_layers, penultimate_hidden
from .ib_controller import AdaptiveIBController, reduce_for_controller
from .kd import ce_loss, kd_loss
from .rcka import cosine_gram_cka, image_token_counts, rcka_loss

__all__ = [
    "AdaptiveIBController", "FakeQuantLinear", "LayerCapture", "QATConfig", "apply_qat", "capture_layer_output",
    "ce_loss", "cosine_gram_cka", "decoder_layers", "fake_quant_modules", "fake_quantize", "freeze_vision",
    "gated_dkd_loss", "image_token_counts", "init_log_scale_mse", "kd_loss", "linear_cka", "mean_quant_scale",
    "penultimate_hidden", "qat_param_groups", "qat_state_dict", "qat_target_names", "rcka_loss",
    "reduce_for_controller", "strip_qat", "teacher_confidence_gate",
]
