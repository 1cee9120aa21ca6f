"""Models only: the one attention (with TACA), FLUX.1, SD3 / SD3.5, text encoders, autoencoder, LoRA."""


def build_model(params):
    """An uninitialized transformer for a params dataclass (build it under `torch.device("meta")` to skip init)."""
    from .flux import Flux, FluxParams
    from .sd3 import SD3, SD3Params

    if isinstance(params, FluxParams):
        return Flux(params)
    if isinstance(params, SD3Params):
        return SD3(params)
    raise TypeError(f"no model for params of type {type(params).__name__}")
