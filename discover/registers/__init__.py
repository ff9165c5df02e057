"""Test-time registers: move the high-norm outlier tokens of a ViT onto an extra token.

Jiang, Dravid, Efros and Gandelsman (*Vision Transformers Don't Need Trained Registers*,
NeurIPS 2025; code: nickjiang2378/test-time-registers) trace the high-norm patch tokens of
Darcet et al. to a sparse set of MLP units, the *register neurons*: they fire on the few
patches that become outliers and write the large vector that makes them so. Moving those
units' activation from the patches onto one extra, untrained token at test time makes that
token play the role of a trained register.

Four modules, one job each: :mod:`~discover.registers.neurons` (the neuron file),
:mod:`~discover.registers.search` (finding the neurons), :mod:`~discover.registers.shipped`
(the files shipped with the package) and :mod:`~discover.registers.intervene` (the
intervention), with :mod:`~discover.registers.model` for the checks they share.

Two steps, both on a timm ``VisionTransformer`` or ``Eva`` (DINOv3 S/B/L) with plain
``Mlp`` blocks (the wrapper :class:`discover.backbone.Backbone` or the bare model). Gated
MLPs (SwiGLU: DINOv3 S+ and H+, EVA-02) are refused: their hidden unit is
``act(fc1_g x) * fc1_x x``, with no single activation module whose output is the unit:

1. :func:`find_register_neurons` runs a set of images and ranks every MLP unit
   ``(layer, index)`` (post-GELU output, timm's ``blocks[l].mlp.act``):

   - the outliers are the patch tokens whose norm at the output of block ``layer`` is
     above ``threshold`` (the paper: DINOv2-L, second-to-last block, 150; CLIP-B/16, last
     block, 30);
   - for each image holding outliers and each unit, the score is the mean of ``|act|``
     over the outlier tokens, set to zero unless the unit is *sparse* on that image: its
     activation is below ``sparsity`` (0.5) on at least ``sparsity_fraction`` (half) of
     the image's tokens ([CLS] included);
   - scores are averaged over the images holding outliers (the others are skipped), the
     units of blocks after ``max_layer`` are dropped, and the ``top_k`` best are kept
     (the paper: DINOv2-L top 50 up to block 17; CLIP-B/16 top 10 up to block 5).

   Data-driven defaults (each recorded in the result): ``threshold="auto"`` is
   :func:`discover.diagnostics.outlier_threshold` on the pooled patch norms of all the
   images (a norm at least twice the median and 5 robust standard deviations above it on
   a log scale; ``"quantile:Q"`` takes a quantile instead, for models without real
   outliers); ``layer=None`` is the block of the second half of the network whose
   patch-norm maps have the largest mean log(max / median) ratio; ``max_layer=None`` is
   the first block at whose output the outlier tokens already stand out by half of their
   final log norm ratio (the units that create an outlier must sit at or before the block
   where it appears).

2. :func:`attach_test_time_registers` adds ``num_registers`` zero tokens right after the
   model's own prefix tokens ([CLS] and any trained registers), after the position
   embedding and with none of their own, so the sequence is ``[CLS, regs..., ttr...,
   patches]`` (a forward pre-hook on ``model.norm_pre``, which timm runs right after
   ``_pos_embed`` and its patch dropout; ``model.num_prefix_tokens`` is left alone, as
   ``_pos_embed`` relies on it). In rotary models (``Eva``) each attention's own
   ``num_prefix_tokens`` (the tokens it does not rotate) grows by the tokens added while
   they are attached, so the rotary embedding still meets the patches it was computed
   for and the added tokens get none, as they get no absolute position embedding in a
   ``VisionTransformer``. In each block holding selected units, a hook on
   ``mlp.act`` writes into every test-time register the largest-magnitude activation of
   that block's selected units (one signed value per image, taken over all tokens and all
   those units, as the reference does) and zeroes those units on the patch tokens; [CLS]
   and trained registers are left alone. The wrapper counts them as registers
   (:meth:`~discover.backbone.Backbone.add_registers`), so its split of the output into
   [CLS] / registers / patches stays exact; :meth:`TestTimeRegisters.detach` undoes
   everything.

Where this differs from the reference on purpose:

- the intervention edits every image of a batch (the reference edits only the first);
- the extra token sits after the prefix, not at the end, and the backbone counts it as a
  register (the reference's DINOv2 output split takes it for a patch and drops the first
  patch instead);
- outliers are searched among the patch tokens only ([CLS] and registers are never
  outliers by definition here), and units scoring zero are never selected.

Neuron lists are small JSON files (:meth:`RegisterNeurons.save`); the one for the offline
DINOv2 ViT-S/14 ships in ``discover/data/<model name>.json`` and is what ``"auto"`` loads.
That model turns out to have no high-norm outliers (its largest patch norm stays within
about 2x the median at every block), so its file was computed on the top 1% of patch
norms and the intervention changes little there; the file's ``notes`` say how it was made.
"""

from discover.diagnostics import outlier_threshold
from discover.registers.intervene import TestTimeRegisters, attach_test_time_registers
from discover.registers.neurons import FORMAT, RegisterNeurons
from discover.registers.search import find_register_neurons
from discover.registers.shipped import resolve_neurons, shipped_neurons_path

__all__ = [
    "FORMAT",
    "RegisterNeurons",
    "TestTimeRegisters",
    "attach_test_time_registers",
    "find_register_neurons",
    "outlier_threshold",
    "resolve_neurons",
    "shipped_neurons_path",
]
