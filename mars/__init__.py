"""MARS: autoregressive text-to-image generation inside a frozen pretrained LLM.

    from mars import MarsPipeline, SemVIE
    pipe = MarsPipeline.from_pretrained("shapes-demo")
    images = pipe.generate(["a red circle", "一个蓝色的正方形"], cfg_scale=4.0, seed=0)
"""

__version__ = "0.1.0"

__all__ = ["MarsPipeline", "MultimodalVocab", "SemVIE", "SemVIEConfig", "__version__"]

# Imported when first asked for, so that `mars --help` and argument errors do not wait for torch
# (~2.4 s); the pipeline also pulls in the VQ-GAN, image IO and tqdm.
_LAZY = {"MarsPipeline": "mars.pipeline", "MultimodalVocab": "mars.vocab", "SemVIE": "mars.model.semvie",
         "SemVIEConfig": "mars.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mars' has no attribute {name!r}")
