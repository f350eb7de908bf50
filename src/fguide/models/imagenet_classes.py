"""The 1000 ImageNet-1k class names in class-index order (line k of ``imagenet_classes.txt``),
for CLIP zero-shot prompts.

Data, not code: the curated, prompt-friendly names of OpenAI's CLIP zero-shot ImageNet
evaluation (Radford et al. 2021), as shipped by the PyPI package ``open_clip_torch`` 3.3.0
(MIT licence) in ``open_clip/zero_shot_metadata.py`` (``IMAGENET_CLASSNAMES``). Index k is
ImageNet class k (the synset order ADM's class-conditional models and torchvision's
classifiers use), so a CLIP head over these names guides ImageNet models like a ResNet.
Two names repeat, as in CLIP's list: ``missile`` (657, 744) and ``sunglasses`` (836, 837);
those class pairs get identical text embeddings, so CLIP cannot tell them apart.
"""

from importlib.resources import files

IMAGENET_CLASSNAMES: tuple[str, ...] = tuple(
    files("fguide.models").joinpath("imagenet_classes.txt").read_text("utf-8").splitlines()
)
