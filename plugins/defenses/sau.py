"""SAU: Shared Adversarial Unlearning, as the DAM paper and FusionBench apply it to a merged model.

Original: Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by
Unlearning Shared Adversarial Examples", NeurIPS 2023, arXiv:2307.10562 (labelled: it
fine-tunes the model on adversarial examples that fool both it and the backdoored
reference the same way). DAM (Yang et al., ICLR 2025) uses a label-free adaptation as a
post-merge baseline; this is that adaptation, checked in FusionBench
``method/concrete_subspace/clip_post_defense.py`` (``PostDefenseSAUAlgorithmForCLIP``) and
``config/method/concrete_subspace/clip_post_defense_SAU.yaml``. Like AWM
(``plugins/defenses/awm.py``, whose loop :func:`learn_post_mask` this reuses) it learns a soft
mask on the merged task vector θ_m − θ_pre with one input perturbation δ_k per task; it adds
a frozen reference f_ref = the undefended merge θ_m.

- δ step (θ detached), per task, with ŷ = argmax f_θ(x): a sample is *shared* when both
  models are fooled (each one's prediction on x + δ differs from its own clean prediction)
  and both predict the same label. Loss = β1·(−CE(f_θ(x + δ), ŷ))
  + β2·Σ_{i not shared} JS(p_θ(x_i + δ) ‖ p_ref(x_i + δ)) / B, minimised over δ: the JS
  term drives δ toward adversarial examples the two models share. Probabilities are
  clamped at 1e-8 inside the JS, as the code does.
- Mask step, per task, x̃ = clip(x + δ): H(f_θ(x)) + ``adv_weight``·H(f_θ(x̃))
  + ``shared_weight``·L_sh. With t = argmax f_ref(x̃), the potential-poison set is
  P = {i : t_i ≠ ŷ_i and t_i ≠ argmax f_ref(x_i)} (ŷ from the masked model: there are no
  labels), and L_sh = −(1/B) Σ_{i∈P} log(1 − p_θ(t_i | x̃_i)), 0 when P is empty. The code
  averages two algebraically equal forms, ½[−Σ log(1e-6 + min(Σ_{c≠t} p_c, 0.999))
  − Σ log(1 + 1e-6 − max(p_t, 0.001))], for numerical stability; so does this.

Defaults (the config): β1 = β2 = 0.5, ``adv_weight`` 0.01, ``shared_weight`` 0.01; the rest
as AWM (2000 steps, batch 16 per task, mask lr 1e-3, δ lr 1e-4, temperature 0.5, logits 0).
The reconstructed choices are AWM's (seeded final mask or its expectation, the clip to the
valid normalised range, untouched tensors unmasked, the dev split). The original labelled
SAU (BackdoorBench: PGD L∞ 0.2, 100 epochs on 5 % labelled data) is not implemented.

``Merged.info`` is AWM's plus, averaged over the last 10 % of steps, the fraction of
samples counted shared in the δ step and in the potential-poison set of the mask step.
"""
from __future__ import annotations

from typing import Any

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Context, Param, StateDict
from mmbench_plugins.defenses.awm import AdversarialWeightMasking, entropy


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2, of rows of
    probabilities (clamped at 1e-8 as FusionBench does)."""
    p, q = p.clamp_min(1e-8), q.clamp_min(1e-8)
    mix = 0.5 * (p + q)
    return (0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * mix.log() + q * mix.log())).sum(-1)


def shared_mask(clean: torch.Tensor, adv: torch.Tensor, clean_ref: torch.Tensor,
                adv_ref: torch.Tensor) -> torch.Tensor:
    """Samples whose perturbation fools both models (each against its own clean prediction)
    into the same label."""
    pred, pred_ref = adv.argmax(-1), adv_ref.argmax(-1)
    fooled = (pred != clean.argmax(-1)) & (pred_ref != clean_ref.argmax(-1))
    return fooled & (pred == pred_ref)


def potential_poison(clean: torch.Tensor, clean_ref: torch.Tensor, adv_ref: torch.Tensor) -> torch.Tensor:
    """P = {i : t_i ≠ ŷ_i and t_i ≠ argmax f_ref(x_i)}, t = argmax f_ref(x̃), ŷ = argmax f_θ(x)."""
    target = adv_ref.argmax(-1)
    return (target != clean.argmax(-1)) & (target != clean_ref.argmax(-1))


def shared_loss(adv: torch.Tensor, adv_ref: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
    """L_sh = −(1/B) Σ_{i∈P} log(1 − p_θ(t_i | x̃_i)), t = argmax f_ref(x̃), as the average of
    FusionBench's two clamped forms; 0 when P is empty."""
    if not bool(poison.any()):
        return adv.new_zeros(())
    p = adv.softmax(-1)
    one_hot = F.one_hot(adv_ref.argmax(-1), p.shape[-1]).to(p)
    pos = (p * one_hot).sum(-1)[poison]
    neg = (p * (1 - one_hot)).sum(-1)[poison]
    value = -(torch.log(1e-6 + neg.clamp(max=0.999)).sum() + torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2
    return value / adv.shape[0]


def sau_delta_loss(ctx: Context, task: str, x: torch.Tensor, perturbed: torch.Tensor,
                   weights: StateDict, reference: StateDict, params: dict[str, Any]):
    """β1·(−CE(f_θ(x + δ), ŷ)) + β2·Σ_{not shared} JS(p_θ ‖ p_ref)/B (θ detached; over δ)."""
    inputs = torch.cat([x, perturbed])
    both = ctx.forward(weights, inputs, task)
    both_ref = ctx.forward(reference, inputs, task)
    n = len(x)
    clean, adv, clean_ref, adv_ref = both[:n], both[n:], both_ref[:n], both_ref[n:]
    shared = shared_mask(clean, adv, clean_ref, adv_ref)
    js = js_divergence(adv.softmax(-1), adv_ref.softmax(-1))[~shared].sum() / n
    loss_adv = -F.cross_entropy(adv, clean.argmax(-1).detach())
    return (float(params["beta1"]) * loss_adv + float(params["beta2"]) * js,
            {"shared_fraction": float(shared.float().mean())})


def sau_mask_loss(ctx: Context, task: str, x: torch.Tensor, perturbed: torch.Tensor,
                  weights: StateDict, reference: StateDict, params: dict[str, Any]):
    """H(f_θ(x)) + adv_weight·H(f_θ(x̃)) + shared_weight·L_sh."""
    inputs = torch.cat([x, perturbed])
    both = ctx.forward(weights, inputs, task)
    with torch.no_grad():
        both_ref = ctx.forward(reference, inputs, task)
    n = len(x)
    clean, adv, clean_ref, adv_ref = both[:n], both[n:], both_ref[:n], both_ref[n:]
    poison = potential_poison(clean.detach(), clean_ref, adv_ref)
    h_clean, h_adv = entropy(clean), entropy(adv)
    l_sh = shared_loss(adv, adv_ref, poison)
    value = h_clean + float(params["adv_weight"]) * h_adv + float(params["shared_weight"]) * l_sh
    return value, {"entropy_clean": h_clean.item(), "entropy_perturbed": h_adv.item(),
                   "shared_loss": l_sh.item(), "poison_fraction": float(poison.float().mean())}


class SharedAdversarialUnlearning(AdversarialWeightMasking):
    name = "sau"
    description = ("SAU (Wei et al. 2023), FusionBench's post-merge adaptation: AWM's mask with "
                   "shared adversarial examples of the merge and the mask")
    uses_reference = True
    params = {
        **AdversarialWeightMasking.params,
        "beta1": Param(0.5, "float", min=0, help="δ step: weight of the adversarial cross-entropy"),
        "beta2": Param(0.5, "float", min=0, help="δ step: weight of the JS term (toward shared examples)"),
        "shared_weight": Param(0.01, "float", min=0, help="mask step: weight of the shared-unlearning loss"),
    }
    # AWM's two passes plus the reference's: a forward+backward in the δ step, a forward in the mask step
    passes = 3.5

    def delta_loss(self, *args):
        return sau_delta_loss(*args)

    def mask_loss(self, *args):
        return sau_mask_loss(*args)


@mmbench.hookimpl
def mmbench_register_defenses(register):
    register(SharedAdversarialUnlearning())
