"""FineDiffusion (Pan et al., 2024) and the fine-tuning baselines it is compared with.

What each method trains on a pretrained DiT (the official code selects by parameter NAME):

- `finediffusion`: the tiered class table (fine rows, then superclass rows), every bias and the
  LayerNorm γ/β that FineDiffusion adds (`affine_norms`); 12,153,632 of 685,640,480 parameters
  (1.77 %) for DiT-XL/2 on 10,000 + 11 classes. Class dropout goes to the label's superclass row
  and guidance pushes away from it (superclass-conditioned guidance):
      ε̃ = ε(x, s(y)) + w·(ε(x, y) − ε(x, s(y))).
- `full_finetune`: every parameter; class dropout to the null row; plain CFG.
- `bitfit` (Ben Zaken et al., 2022): biases, plus the class table, which must train because the
  fine-grained classes are new (their rows have no pretrained values).
- `difffit` (Xie et al., 2023): biases, norms (none unless the model has `affine_norms`), the
  class table and a per-channel γ (init 1) scaling each block's attention and MLP branches.

`model_overrides` on each method names the backbone options it needs; the builder applies them.
Pretrained weights: a base run (at paper scale the `pretrain` that adopts DiT's release) goes under
a fine-tuning run by `load_base_state`, class table discarded; a PEFT run stores only its trained
tensors, put back on its base run's weights by `runs.load_trained`.
"""

from __future__ import annotations

import torch

from diffrepro.errors import UserError
from diffrepro.methods.base import Method, register_method

CLASS_TABLE = "y_embedder.embedding_table.weight"


def _train_only(model: torch.nn.Module, trainable) -> None:
    """requires_grad from a rule on parameter names; the fixed positional table never trains."""
    for name, p in model.named_parameters():
        p.requires_grad_(name != "pos_embed" and trainable(name))


@register_method("finediffusion")
class FineDiffusion(Method):
    """Tiered class table + biases + affine norms; dropout and guidance to the superclass row."""

    peft = True
    tiered_classes = True

    model_overrides = {"affine_norms": True}

    def configure_model(self, model: torch.nn.Module) -> None:
        if not getattr(model, "num_super_classes", 0):
            raise UserError("method finediffusion needs num_super_classes > 0 in the model params "
                            "(its class table holds one row per superclass after the fine classes)")
        _train_only(model, lambda name: CLASS_TABLE in name or "bias" in name or "norm" in name)

    def superclass_rows(self, super_labels: torch.Tensor, model) -> torch.Tensor:
        """Row of each superclass in the tiered table: after the `num_classes` fine rows."""
        return model.num_classes + super_labels

    def training_labels(self, labels, super_labels, generator, model):
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
        return torch.where(drop, self.superclass_rows(super_labels, model), labels)

    def guidance_labels(self, labels, super_labels, model):
        """Superclass-conditioned guidance: the branch to push away from is the label's superclass."""
        return self.superclass_rows(super_labels, model)


@register_method("full_finetune")
class FullFinetune(Method):
    """Every parameter trains (the fixed positional table excepted); null-class dropout and CFG."""


@register_method("bitfit")
class BitFit(Method):
    """Biases only, plus the new class table (the fine-grained classes have no pretrained rows)."""

    peft = True

    def configure_model(self, model: torch.nn.Module) -> None:
        _train_only(model, lambda name: CLASS_TABLE in name or "bias" in name)


@register_method("difffit")
class DiffFit(Method):
    """Biases, norms, class table and the per-block scale factors γ added by `block_scales`."""

    peft = True

    model_overrides = {"block_scales": True}

    def configure_model(self, model: torch.nn.Module) -> None:
        if not any(".gamma_" in name for name, _ in model.named_parameters()):
            raise UserError("method difffit needs the model built with block_scales: true")
        _train_only(model, lambda name: (CLASS_TABLE in name or "bias" in name or "norm" in name
                                         or ".gamma_" in name))


# Parameters a fine-tuning variant adds to DiT, absent from the official checkpoint: they keep
# their identity init (LN γ=1, β=0; DiffFit γ=1) or, for the class table, a fresh N(0, std) init.
NEW_PARAMETER_SUFFIXES = (".norm1.weight", ".norm1.bias", ".norm2.weight", ".norm2.bias",
                          "final_layer.norm_final.weight", "final_layer.norm_final.bias",
                          ".gamma_msa", ".gamma_mlp")


def load_base_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load a base DiT's tensors into `model`, discarding its class table (the classes are new).

    The base is a trained run's weights: the `pretrain` that adopted DiT's release (paper scale) or
    the DiT trained on the base classes (default scale). Returns the names
    left at their fresh init: the class table and NEW_PARAMETER_SUFFIXES only, else UserError.
    """
    state = {k: v for k, v in state.items() if k != CLASS_TABLE}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: a different DiT size or resolution
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{source} does not fit this DiT ({first}); check the model size and image_size") from err
    unknown_missing = [k for k in missing if k != CLASS_TABLE and not k.endswith(NEW_PARAMETER_SUFFIXES)]
    if unknown_missing or unexpected:
        raise UserError(f"{source} does not match this DiT: missing {unknown_missing[:5]}, "
                        f"unexpected {list(unexpected)[:5]}")
    return list(missing)

