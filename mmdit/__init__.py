"""Models only: the one attention (with TACA), FLUX.1, FLUX.2, SD3 / SD3.5, text encoders, autoencoders, LoRA."""

from .flux import Flux, FluxParams
from .flux2 import Flux2, Flux2Params
from .sd3 import SD3, SD3Params

MODELS = {cls.family: cls for cls in (Flux, Flux2, SD3)}  # "flux", "flux2", "sd3": the model class of each params family


def build_model(params: FluxParams | Flux2Params | SD3Params) -> Flux | Flux2 | SD3:
    """An uninitialized transformer for `params`, chosen by `params.family` (build it under
    `torch.device("meta")` to skip init); a family without a model is a ValueError."""
    if params.family not in MODELS:
        raise ValueError(f"no model for the family {params.family!r}; known: {', '.join(MODELS)}")
    return MODELS[params.family](params)
