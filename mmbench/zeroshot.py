"""Zero-shot heads from the text tower: prompt templates per dataset family.

docs/methods.md ("Shared protocol"): each class embedding is the mean over
prompt templates of the L2-normalised text embedding, renormalised, times
``logit_scale.exp()``; the head is frozen. :func:`mmbench.models.zeroshot_head`
does the arithmetic; this module chooses the templates and runs it on the
device (the paper presets' 8 tasks have ~750 classes × 3–6 prompts, minutes on
a CPU, a second on a GPU).

The template lists are written for mmbench in the style of the CLIP paper's
prompt engineering ("a photo of a {}."): a few short prompts per dataset
family that say what kind of image it is (satellite photo, traffic sign,
texture, ...). They are not the CLIP paper's lists; the exact wording is
reconstructed, so zero-shot accuracies differ slightly from published ones.
The heads only need to be fixed and sensible: fine-tuning adapts the encoder
to them, and every stage keyed on the heads includes these strings
(``SharedStages.heads_key``), so editing a list recomputes what depends on it.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

GENERIC = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of a {}.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "generic": GENERIC,
    "cifar": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a low-resolution photo of the {}.",
        "a small photo of a {}.",
        "a pixelated image of the {}.",
    ),
    "imagenet": (
        "a photo of a {}.",
        "a bad photo of the {}.",
        "a bright photo of a {}.",
        "a cropped photo of the {}.",
        "a drawing of a {}.",
        "a photo of many {}.",
    ),
    "gtsrb": (
        'a photo of a "{}" traffic sign.',
        'a close-up of the "{}" road sign.',
        'a street photo showing a "{}" sign.',
    ),
    "eurosat": (
        "a satellite image of {}.",
        "a satellite photo showing {}.",
        "an aerial view of {} from space.",
    ),
    "resisc45": (
        "a satellite photo of a {}.",
        "an aerial image of the {}.",
        "a remote sensing image showing a {}.",
    ),
    "cars": (
        "a photo of a {}.",
        "a photo of the {}, a type of car.",
        "a close-up photo of my {}.",
    ),
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}, a kind of place.",
        "a picture taken at a {}.",
    ),
    "pets": (
        "a photo of a {}, a type of pet.",
        "a photo of the {}, a breed of cat or dog.",
        "a close-up picture of a {}.",
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a close-up photo of a {} pattern.",
        "a photo of a {} surface.",
    ),
    "svhn": (
        'a photo of the house number "{}".',
        'a street photo of the digit "{}".',
        'a cropped image of the number: "{}".',
    ),
    "mnist": (
        'a photo of the number: "{}".',
        'a handwritten digit "{}".',
        "a black and white image of the number {}.",
    ),
}

# normalised task names (lower case, letters and digits only) → template family
ALIASES = {
    "cifar10": "cifar", "cifar100": "cifar",
    "imagenet": "imagenet", "imagenet100": "imagenet", "imagenet1k": "imagenet",
    "gtsrb": "gtsrb",
    "eurosat": "eurosat",
    "resisc45": "resisc45",
    "cars": "cars", "stanfordcars": "cars",
    "sun397": "sun397",
    "pets": "pets", "oxfordpets": "pets", "oxfordiiitpet": "pets",
    "dtd": "dtd",
    "svhn": "svhn",
    "mnist": "mnist",
}


# What a pretraining caption says of an image whose class it does not name (ModelSpec.pretrain_named):
# its task's concept, by source; other sources: the task's name.
CONCEPTS = {
    "fashion_mnist": "piece of clothing",
    "animal_mnist": "animal silhouette",
    "digits": "handwritten digit",
    "font_letters": "printed letter",
    "photo_patches": "patch of a photo",
    "texture_patches": "patch of a grey image",
}


def concept(task_spec) -> str:
    return CONCEPTS.get(task_spec.source, task_spec.name.replace("_", " "))


def template_family(task_spec) -> str:
    """The family whose templates a task uses: ``source_args["template_family"]``,
    else its name through :data:`ALIASES`, else ``generic``."""
    explicit = (task_spec.source_args or {}).get("template_family")
    if explicit is not None:
        if explicit not in TEMPLATES:
            raise ValueError(f"task {task_spec.name!r}: unknown template_family {explicit!r}; "
                             f"known: {', '.join(sorted(TEMPLATES))}")
        return explicit
    return ALIASES.get(re.sub(r"[^a-z0-9]", "", task_spec.name.lower()), "generic")


def templates_for(task_spec) -> tuple[str, ...]:
    """Prompt templates (each with one ``{}`` for the class name) for a :class:`~mmbench.presets.TaskSpec`."""
    return TEMPLATES[template_family(task_spec)]


@torch.no_grad()
def build_head(model: torch.nn.Module, tokenizer: Callable, class_names: Iterable[str], task_spec,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The frozen zero-shot head (num_classes, embed_dim) of one task, on the CPU.

    Runs :func:`mmbench.models.zeroshot_head` (mean of normalised template
    embeddings, renormalised, × logit scale) with ``model`` on ``device``;
    the model is left on that device in eval mode.
    """
    from .models import zeroshot_head

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    head = zeroshot_head(model, lambda texts: tokenizer(texts).to(device), list(class_names),
                         templates_for(task_spec))
    return head.float().cpu()
