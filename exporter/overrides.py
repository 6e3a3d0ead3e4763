"""Per-architecture family configs: a subclass exists only where the generic path measurably
fails, with a docstring saying why, and is registered in :data:`OVERRIDES` (model_type -> class),
which exporter/families.py consults first. Their patch functions are in exporter/patchers.py."""

from __future__ import annotations

from typing import ClassVar

import torch

from gpcl_trt.exporter.configs import ArchConfig, DecoderOnly
from gpcl_trt.exporter.patchers import apply_rotary_pairs, falcon_alibi_bf16_emulated, rotary_as_real_pairs


class Falcon(DecoderOnly):
    """Falcon with ``alibi=True`` (falcon-rw): its ALiBi bias is a bfloat16 product, which the
    exporter writes as a bfloat16 Mul that ONNX Runtime's CPU provider cannot run; the generic
    path exports but never validates. Rotary Falcon (7B/40B/180B style) is the generic path."""

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        core = super().core(model, task)
        if getattr(self.hf_config, "alibi", False):
            from transformers.models.falcon import modeling_falcon

            core.patches.append((modeling_falcon, "build_alibi_tensor", falcon_alibi_bf16_emulated))
        return core


class RealRotary(DecoderOnly):
    """DeepSeek-V2 and Llama 4 compute RoPE as complex products (``torch.polar``,
    ``view_as_complex``); ONNX has no complex type and the exporter stops ("no decompositions
    registered for the complex-valued input"). Here the same products run in real arithmetic on
    (cos, sin) pairs while the model is traced (and validated: the numbers agree with the complex
    version to float rounding, tests/test_families.py)."""

    # model_type -> (transformers module, rotary module class, where apply_rotary_emb's q/k keep heads)
    WHERE: ClassVar[dict[str, tuple[str, str, int]]] = {
        "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2RotaryEmbedding", 1),
        "llama4_text": ("transformers.models.llama4.modeling_llama4", "Llama4TextRotaryEmbedding", 2),
    }

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        import importlib

        from transformers.modeling_rope_utils import dynamic_rope_update

        core = super().core(model, task)
        module_name, rotary_class, head_axis = self.WHERE[self.name]
        module = importlib.import_module(module_name)
        core.patches += [
            (getattr(module, rotary_class), "forward", dynamic_rope_update(rotary_as_real_pairs)),
            (module, "apply_rotary_emb", apply_rotary_pairs(head_axis)),
        ]
        return core


# Per-architecture classes, only where the generic path measurably fails (model_type -> class).
OVERRIDES: dict[str, type[ArchConfig]] = {"falcon": Falcon, **dict.fromkeys(RealRotary.WHERE, RealRotary)}
