"""MARS: autoregressive text-to-image generation inside a frozen pretrained LLM.

    from mars import MarsPipeline, SemVIE
    pipe = MarsPipeline.from_pretrained("shapes-demo")
    images = pipe.generate(["a red circle", "一个蓝色的正方形"], cfg_scale=4.0, seed=0)
"""

from mars.config import SemVIEConfig
from mars.model.semvie import SemVIE
from mars.vocab import MultimodalVocab

__version__ = "0.1.0"

__all__ = ["MarsPipeline", "MultimodalVocab", "SemVIE", "SemVIEConfig", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in the VQ-GAN, image IO and tqdm: import it only when it is asked for.
    if name == "MarsPipeline":
        from mars.pipeline import MarsPipeline

        return MarsPipeline
    raise AttributeError(f"module 'mars' has no attribute {name!r}")
