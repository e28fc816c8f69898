"""Booster: harden an aligned LLM against harmful fine-tuning, and measure whether it works.

For your own training loop (``booster.api``; the pipeline trains with the same class):

    BoosterStep(model, lam=5.0, alpha=0.1).backward(align_batch, harmful_batch)
    booster_backward(model, align_batch, harmful_batch, lam=5.0, alpha=0.1)

leave in ``.grad`` the gradient of Booster's objective (Huang et al., ICLR 2025, Eq. 2-3)

    min_w  f(w) + λ·( h(w) − h(w − α·∇h(w)/‖∇h(w)‖) )
    g = ∇f(w) + λ·( ∇h(w) − ∇h(w̃) ),   w̃ = w − α·∇h(w)/‖∇h(w)‖

and the weights bit for bit as they were.
"""

__version__ = "0.1.0"
__all__ = ["BoosterStep", "booster_backward"]


def __getattr__(name: str):
    # imported on use: `import booster` (the CLI, configs) stays free of torch
    if name in __all__:
        from booster import api

        return getattr(api, name)
    raise AttributeError(f"module 'booster' has no attribute {name!r}")
